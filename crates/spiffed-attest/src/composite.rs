//! The composite attestor: the configured plugins, each owning its selector types, run together.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use spiffed_core::{
    AttestError, Attested, Attestor, AttestorPlugin, LeftOut, LogGate, Needs, PeerCred, Selector,
    SelectorCheck, SelectorError, Selectors, known_list,
};

use crate::{SystemdPlugin, UnixPlugin};

/// The selector type whose plugin always runs: `unix:uid` and `unix:gid` come from the
/// kernel's credentials for every caller, and the unix plugin is what proves, with the pidfd,
/// that the process that connected still runs.
const ALWAYS: &str = "unix";
/// The kinds every caller is attested for (from `SO_PEERCRED`).
const CREDENTIALS: [&str; 2] = ["unix:uid", "unix:gid"];

/// The [`Attestor`] and [`SelectorCheck`] of the agent: a list of [`AttestorPlugin`]s, each
/// owning its selector types.
///
/// - [`check`](SelectorCheck::check) hands a selector to the plugin that owns its type; a type
///   no plugin owns is [`SelectorError::UnknownType`], listing the configured types.
/// - [`attest`](Attestor::attest) runs, concurrently, the plugins whose types the [`Needs`] ask
///   for (the plugin owning `unix` always) and merges what they found. A plugin error that
///   [`is_fatal`](AttestError::is_fatal) (the caller is gone) fails the attestation; any other
///   error costs only that plugin's selectors for that caller: each kind of its types the needs
///   asked for is reported in [`Attested::left_out`] with the reason, and the error is logged
///   (at most once a minute per plugin, with a count of the lines held back). A plugin's
///   selectors of types it does not own are dropped, so no plugin can vouch for another's.
pub struct CompositeAttestor {
    plugins: Vec<Plugin>,
}

struct Plugin {
    plugin: Arc<dyn AttestorPlugin>,
    /// Gates the log line for this plugin's failures.
    failed_log: LogGate,
}

/// Why a list of plugins cannot be composed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompositeError {
    /// Two plugins derive the same selector type, so neither can be trusted to own it.
    #[error(
        "the {first} and {second} attestors both derive selectors of type {kind:?}; configure \
         only one of them"
    )]
    DuplicateType {
        /// The selector type.
        kind: &'static str,
        /// The plugin listed first.
        first: &'static str,
        /// The plugin listed later.
        second: &'static str,
    },
}

/// The built-in plugins, `unix` and `systemd`, composed.
pub fn builtin() -> CompositeAttestor {
    CompositeAttestor::compose(vec![
        Arc::new(UnixPlugin::new()),
        Arc::new(SystemdPlugin::new()),
    ])
}

impl CompositeAttestor {
    /// Composes `plugins`, in this order (which is the order [`types`](Self::types) and error
    /// messages list their types in); fails when two of them derive the same selector type.
    pub fn new(plugins: Vec<Arc<dyn AttestorPlugin>>) -> Result<Self, CompositeError> {
        let mut owners: Vec<(&'static str, &'static str)> = vec![];
        for plugin in &plugins {
            for &kind in plugin.selector_types() {
                if let Some(&(_, first)) = owners.iter().find(|(k, _)| *k == kind) {
                    return Err(CompositeError::DuplicateType {
                        kind,
                        first,
                        second: plugin.name(),
                    });
                }
                owners.push((kind, plugin.name()));
            }
        }
        Ok(Self::compose(plugins))
    }

    /// Composes plugins known to own distinct types.
    fn compose(plugins: Vec<Arc<dyn AttestorPlugin>>) -> Self {
        Self {
            plugins: plugins
                .into_iter()
                .map(|plugin| Plugin {
                    plugin,
                    failed_log: LogGate::default(),
                })
                .collect(),
        }
    }

    /// The selector types the configured plugins derive, in order (`unix`, `systemd`).
    pub fn types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.plugins
            .iter()
            .flat_map(|p| p.plugin.selector_types().iter().copied())
    }

    /// The plugin that owns selector type `kind`.
    fn owner(&self, kind: &str) -> Option<&Plugin> {
        self.plugins
            .iter()
            .find(|p| p.plugin.selector_types().contains(&kind))
    }

    /// Whether `plugin` has anything to gather for `needs`.
    fn runs(plugin: &dyn AttestorPlugin, needs: &Needs) -> bool {
        plugin
            .selector_types()
            .iter()
            .any(|&kind| kind == ALWAYS || needs.wants_type(kind))
    }
}

impl fmt::Debug for CompositeAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompositeAttestor")
            .field(
                "plugins",
                &self
                    .plugins
                    .iter()
                    .map(|p| p.plugin.name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SelectorCheck for CompositeAttestor {
    fn check(&self, selector: &Selector) -> Result<(), SelectorError> {
        match self.owner(selector.kind()) {
            Some(owner) => owner.plugin.check(selector),
            None => Err(SelectorError::UnknownType {
                selector: selector.to_string(),
                known: known_list(self.types()),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Attestor for CompositeAttestor {
    async fn attest(&self, peer: &PeerCred, needs: &Needs) -> Result<Attested, AttestError> {
        let running: Vec<&Plugin> = self
            .plugins
            .iter()
            .filter(|p| Self::runs(p.plugin.as_ref(), needs))
            .collect();
        let results =
            futures::future::join_all(running.iter().map(|p| p.plugin.attest(peer, needs))).await;

        let mut gathered = needs.clone();
        for kind_key in CREDENTIALS {
            gathered.insert(kind_key);
        }
        let mut attested = Attested {
            uid: peer.uid,
            ..Attested::default()
        };
        let mut selectors = Selectors::new();
        // A fatal error anywhere fails the whole attestation, whatever else was found.
        let mut results: Vec<_> = running.into_iter().zip(results).collect();
        if let Some(pos) = results
            .iter()
            .position(|(_, r)| r.as_ref().is_err_and(AttestError::is_fatal))
            && let (_, Err(e)) = results.swap_remove(pos)
        {
            return Err(e);
        }
        for (p, result) in results {
            let plugin = p.plugin.as_ref();
            match result {
                Ok(found) => {
                    for s in found.selectors {
                        if plugin.selector_types().contains(&s.kind()) {
                            selectors.insert(s);
                        } else {
                            tracing::warn!(
                                plugin = plugin.name(),
                                selector = %s,
                                "dropping a selector of a type this attestor does not own"
                            );
                        }
                    }
                    if attested.exe.is_none() {
                        attested.exe = found.exe;
                    }
                    attested.left_out.extend(found.left_out);
                }
                Err(error) => {
                    let reason = error.to_string();
                    let kinds = wanted_kinds(plugin, &gathered);
                    if let Some(held_back) = p.failed_log.admit(Instant::now()) {
                        tracing::info!(
                            plugin = plugin.name(),
                            pid = ?peer.pid,
                            uid = peer.uid,
                            left_out = %kinds.join(", "),
                            %reason,
                            held_back,
                            "attestor failed for this caller: its selectors are left out, so \
                             entries that need them do not match (held_back: similar lines not \
                             logged since the last one)"
                        );
                    }
                    attested
                        .left_out
                        .extend(kinds.into_iter().map(|kind_key| LeftOut {
                            kind_key,
                            reason: reason.clone(),
                        }));
                }
            }
        }
        attested.selectors = selectors;
        attested.gathered = gathered;
        Ok(attested)
    }
}

/// The kinds of `plugin`'s types that `needs` asks for: `TYPE:*` for a type when it asks for
/// everything (the plugin's keys are its own business).
fn wanted_kinds(plugin: &dyn AttestorPlugin, needs: &Needs) -> Vec<String> {
    let mut kinds = vec![];
    for &kind in plugin.selector_types() {
        if needs.is_everything() {
            kinds.push(format!("{kind}:*"));
        } else {
            kinds.extend(
                needs
                    .kind_keys()
                    .filter(|k| k.split_once(':').is_some_and(|(t, _)| t == kind))
                    .map(str::to_owned),
            );
        }
    }
    kinds
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use spiffed_core::PluginAttested;

    use super::*;

    /// What a [`TestPlugin`] answers.
    #[derive(Clone)]
    enum Outcome {
        Selectors(Vec<&'static str>),
        Fail,
        Gone,
    }

    /// A plugin that answers what it is told and counts its calls.
    struct TestPlugin {
        name: &'static str,
        types: &'static [&'static str],
        outcome: Outcome,
        calls: AtomicUsize,
    }

    impl TestPlugin {
        fn new(name: &'static str, types: &'static [&'static str], outcome: Outcome) -> Arc<Self> {
            Arc::new(Self {
                name,
                types,
                outcome,
                calls: AtomicUsize::new(0),
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait::async_trait]
    impl AttestorPlugin for TestPlugin {
        fn name(&self) -> &'static str {
            self.name
        }

        fn selector_types(&self) -> &'static [&'static str] {
            self.types
        }

        fn check(&self, selector: &Selector) -> Result<(), SelectorError> {
            match selector.key() {
                "image" | "label" => Ok(()),
                _ => Err(SelectorError::UnknownKey {
                    selector: selector.to_string(),
                    known: "docker:image and docker:label".to_owned(),
                }),
            }
        }

        async fn attest(
            &self,
            peer: &PeerCred,
            _needs: &Needs,
        ) -> Result<PluginAttested, AttestError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            // Let the other plugins run before answering.
            tokio::task::yield_now().await;
            match &self.outcome {
                Outcome::Selectors(s) => Ok(PluginAttested {
                    selectors: s.iter().map(|s| s.parse().unwrap()).collect(),
                    exe: None,
                    left_out: vec![],
                }),
                Outcome::Fail => Err(AttestError::Plugin {
                    plugin: self.name,
                    reason: "the container runtime did not answer".to_owned(),
                }),
                Outcome::Gone => Err(AttestError::ProcessGone {
                    pid: peer.pid.unwrap_or_default(),
                }),
            }
        }
    }

    /// This process, seen from another PID namespace: the unix plugin reads no `/proc`.
    fn cred() -> PeerCred {
        PeerCred {
            pid: None,
            uid: 3_999_999_001,
            gid: 3_999_999_002,
            pidfd: None,
        }
    }

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    fn needs(kinds: &[&str]) -> Needs {
        kinds.iter().copied().collect()
    }

    fn with(extra: Arc<TestPlugin>) -> CompositeAttestor {
        CompositeAttestor::new(vec![
            Arc::new(UnixPlugin::new()),
            Arc::new(SystemdPlugin::new()),
            extra,
        ])
        .unwrap()
    }

    fn strings(selectors: &Selectors) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    #[tokio::test]
    async fn a_failing_plugin_drops_only_its_own_selectors() {
        let docker = TestPlugin::new("docker", &["docker"], Outcome::Fail);
        let composite = with(Arc::clone(&docker));
        let want = needs(&["unix:uid", "docker:image", "docker:label"]);
        let got = composite.attest(&cred(), &want).await.unwrap();

        assert_eq!(docker.calls(), 1);
        assert_eq!(
            strings(&got.selectors),
            ["unix:gid:3999999002", "unix:uid:3999999001"]
        );
        assert_eq!(got.uid, 3_999_999_001);
        let left: Vec<String> = got.left_out.iter().map(ToString::to_string).collect();
        assert_eq!(
            left,
            [
                "docker:image: the docker attestor failed: the container runtime did not answer",
                "docker:label: the docker attestor failed: the container runtime did not answer",
            ]
        );
        assert!(got.gathered.covers(&want));
        assert!(got.gathered.wants("unix:gid"));
        assert!(!got.gathered.wants("systemd:id"));

        // Asked for everything (explain), the failing plugin's types are left out whole.
        let all = composite
            .attest(&cred(), &Needs::everything())
            .await
            .unwrap();
        assert!(all.selectors.contains(&sel("unix:uid:3999999001")));
        assert_eq!(all.left_out.len(), 1, "{:?}", all.left_out);
        assert_eq!(all.left_out[0].kind_key, "docker:*");
        assert!(all.gathered.is_everything());
    }

    #[tokio::test]
    async fn a_fatal_error_fails_the_whole_attestation() {
        let docker = TestPlugin::new("docker", &["docker"], Outcome::Gone);
        let composite = with(Arc::clone(&docker));
        let got = composite
            .attest(&cred(), &needs(&["unix:uid", "docker:image"]))
            .await;
        assert!(
            matches!(got, Err(AttestError::ProcessGone { .. })),
            "{got:?}"
        );
        assert_eq!(docker.calls(), 1);
    }

    #[tokio::test]
    async fn only_the_plugins_the_needs_ask_for_run() {
        let docker = TestPlugin::new(
            "docker",
            &["docker"],
            Outcome::Selectors(vec!["docker:image:web"]),
        );
        let composite = with(Arc::clone(&docker));

        let got = composite
            .attest(&cred(), &needs(&["unix:uid", "systemd:id"]))
            .await
            .unwrap();
        assert_eq!(docker.calls(), 0);
        assert!(!got.selectors.contains(&sel("docker:image:web")));

        let got = composite
            .attest(&cred(), &needs(&["docker:label"]))
            .await
            .unwrap();
        assert_eq!(docker.calls(), 1);
        assert!(got.selectors.contains(&sel("docker:image:web")));
        assert!(got.selectors.contains(&sel("unix:uid:3999999001")));

        composite
            .attest(&cred(), &Needs::everything())
            .await
            .unwrap();
        assert_eq!(docker.calls(), 2);

        // The plugin owning `unix` runs even when nothing is asked for: uid and gid are always
        // there.
        let unix = TestPlugin::new("fake-unix", &["unix"], Outcome::Selectors(vec![]));
        let composite = CompositeAttestor::new(vec![
            Arc::clone(&unix) as Arc<dyn AttestorPlugin>,
            Arc::clone(&docker) as Arc<dyn AttestorPlugin>,
        ])
        .unwrap();
        composite.attest(&cred(), &Needs::none()).await.unwrap();
        assert_eq!((unix.calls(), docker.calls()), (1, 2));
    }

    #[tokio::test]
    async fn a_plugin_cannot_vouch_for_another_plugins_types() {
        let rogue = TestPlugin::new(
            "docker",
            &["docker"],
            Outcome::Selectors(vec![
                "unix:uid:0",
                "systemd:id:sshd.service",
                "docker:image:web",
            ]),
        );
        let composite = CompositeAttestor::new(vec![rogue]).unwrap();
        let got = composite
            .attest(&cred(), &needs(&["docker:image"]))
            .await
            .unwrap();
        assert_eq!(strings(&got.selectors), ["docker:image:web"]);
    }

    #[tokio::test]
    async fn the_builtin_plugins_attest_a_live_caller() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let cred = crate::listen::peer_cred(&a).unwrap();
        let composite = builtin();
        let exe = std::env::current_exe().unwrap().canonicalize().unwrap();

        let got = composite
            .attest(&cred, &needs(&["unix:path"]))
            .await
            .unwrap();
        assert_eq!(got.exe.as_deref(), Some(exe.as_path()));
        assert!(
            got.selectors
                .contains(&sel(&format!("unix:path:{}", exe.display())))
        );
        assert!(!got.selectors.iter().any(|s| s.kind() == "systemd"));
        assert!(got.left_out.is_empty(), "{:?}", got.left_out);

        let all = composite.attest(&cred, &Needs::everything()).await.unwrap();
        assert!(all.gathered.is_everything());
        assert!(all.left_out.is_empty(), "{:?}", all.left_out);
        assert!(all.selectors.iter().any(|s| s.kind_key() == "unix:sha256"));
        let me = std::process::id();
        let unit = crate::systemd_unit_from_cgroup(&crate::procfs::read(me, "cgroup").unwrap());
        let units: Vec<String> = all
            .selectors
            .iter()
            .filter(|s| s.kind() == "systemd")
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            units,
            unit.map(|u| format!("systemd:id:{u}"))
                .into_iter()
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn checks_reproduce_the_selector_rules() {
        let composite = builtin();
        for good in [
            "unix:uid:0",
            "unix:uid:1000",
            "unix:uid:4294967295",
            "unix:gid:0",
            "unix:supplementary_gid:27",
            "unix:user:alice",
            "unix:group:wheel",
            "unix:supplementary_group:docker",
            "unix:path:/usr/bin/web",
            "unix:path:/usr/bin/with:colon",
            "unix:sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "systemd:id:web.service",
            "systemd:id:app-foo-123.scope",
        ] {
            assert_eq!(composite.check(&sel(good)), Ok(()), "{good}");
        }
        let value = |s: &str, why: &'static str| {
            (
                s.to_owned(),
                SelectorError::Value {
                    selector: s.to_owned(),
                    why,
                },
            )
        };
        const NUMBER: &str = "the value must be a decimal number, e.g. 1000";
        const KEYS: &str = "unix:uid, unix:user, unix:gid, unix:group, unix:supplementary_gid, \
                            unix:supplementary_group, unix:path and unix:sha256";
        for (bad, want) in [
            value("unix:uid:abc", NUMBER),
            value("unix:uid:-1", NUMBER),
            value("unix:uid:01", NUMBER),
            value("unix:uid:00", NUMBER),
            value("unix:uid:4294967296", NUMBER),
            value("unix:gid:1.5", NUMBER),
            value("unix:supplementary_gid:x", NUMBER),
            value(
                "unix:path:relative/bin",
                "the path must be absolute, e.g. /usr/bin/web",
            ),
            value(
                "unix:sha256:ABCD",
                "the value must be 64 lowercase hex digits",
            ),
            value(
                "unix:sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
                "the value must be 64 lowercase hex digits",
            ),
            value(
                "unix:sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
                "the value must be 64 lowercase hex digits",
            ),
            (
                "unix:pid:1".to_owned(),
                SelectorError::UnknownKey {
                    selector: "unix:pid:1".to_owned(),
                    known: KEYS.to_owned(),
                },
            ),
            (
                "systemd:unit:a.service".to_owned(),
                SelectorError::UnknownKey {
                    selector: "systemd:unit:a.service".to_owned(),
                    known: "systemd:id".to_owned(),
                },
            ),
        ] {
            assert_eq!(composite.check(&sel(&bad)), Err(want), "{bad}");
        }
        assert_eq!(
            composite.check(&sel("unix:pid:1")).unwrap_err().to_string(),
            format!("selector \"unix:pid:1\" has an unknown key; known keys are {KEYS}")
        );
        assert_eq!(
            composite
                .check(&sel("unix:uid:01"))
                .unwrap_err()
                .to_string(),
            "selector \"unix:uid:01\": the value must be a decimal number, e.g. 1000"
        );
    }

    #[test]
    fn an_unknown_type_lists_the_configured_types() {
        let e = builtin().check(&sel("k8s:ns:default")).unwrap_err();
        assert_eq!(
            e,
            SelectorError::UnknownType {
                selector: "k8s:ns:default".to_owned(),
                known: "\"unix\" and \"systemd\"".to_owned(),
            }
        );
        assert_eq!(
            e.to_string(),
            "selector \"k8s:ns:default\" has unknown type; known types are \"unix\" and \"systemd\""
        );

        let composite = with(TestPlugin::new("docker", &["docker"], Outcome::Fail));
        assert_eq!(
            composite.types().collect::<Vec<_>>(),
            ["unix", "systemd", "docker"]
        );
        match composite.check(&sel("k8s:ns:default")) {
            Err(SelectorError::UnknownType { known, .. }) => {
                assert_eq!(known, "\"unix\", \"systemd\" and \"docker\"");
            }
            other => panic!("expected UnknownType, got {other:?}"),
        }
        // Each type is checked by its own plugin.
        assert_eq!(composite.check(&sel("docker:image:web")), Ok(()));
        assert!(matches!(
            composite.check(&sel("docker:uid:1")),
            Err(SelectorError::UnknownKey { known, .. }) if known == "docker:image and docker:label"
        ));
        assert_eq!(composite.check(&sel("unix:uid:1000")), Ok(()));

        let only_unix = CompositeAttestor::new(vec![Arc::new(UnixPlugin::new())]).unwrap();
        assert!(matches!(
            only_unix.check(&sel("systemd:id:web.service")),
            Err(SelectorError::UnknownType { known, .. }) if known == "\"unix\""
        ));
    }

    #[test]
    fn two_plugins_cannot_own_one_type() {
        let e = CompositeAttestor::new(vec![
            Arc::new(UnixPlugin::new()),
            TestPlugin::new("fake", &["fake", "unix"], Outcome::Fail),
        ])
        .unwrap_err();
        assert_eq!(
            e,
            CompositeError::DuplicateType {
                kind: "unix",
                first: "unix",
                second: "fake",
            }
        );
        assert!(e.to_string().contains("configure only one of them"), "{e}");
    }
}
