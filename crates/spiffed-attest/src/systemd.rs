//! The systemd attestor plugin: `systemd:id`, the unit a process runs in, from its
//! `/proc/PID/cgroup`.

use spiffed_core::{
    AttestError, AttestorPlugin, LogGate, Needs, PeerCred, PluginAttested, Selector, SelectorError,
    known_list,
};

use crate::keys_sentence;
use crate::pinned::Pinned;

/// The selector type the systemd plugin owns.
const TYPE: &str = "systemd";
/// Its keys.
const KEYS: &[&str] = &["id"];

/// The [`AttestorPlugin`] for `systemd:id`: the systemd unit (`web.service`) whose cgroup the
/// caller runs in (see [`systemd_unit_from_cgroup`]).
///
/// Reads `/proc/PID/cgroup` only when `systemd:id` is needed and the caller's pid is visible
/// (same PID namespace), then proves with the connection's pidfd that the process read is still
/// the one that connected ([`AttestError::ProcessGone`] otherwise). A caller in no unit gets no
/// `systemd:id`. If the agent may not read the file (`/proc` mounted `hidepid`), `systemd:id`
/// is left out with the reason; any other failure to read it is an error of this plugin, which
/// the composite turns into a left-out `systemd:id`.
#[derive(Debug, Default)]
pub struct SystemdPlugin {
    /// Gates the log line for a cgroup file the agent may not read.
    denied_log: LogGate,
}

impl SystemdPlugin {
    /// The plugin.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl AttestorPlugin for SystemdPlugin {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn selector_types(&self) -> &'static [&'static str] {
        &[TYPE]
    }

    /// `systemd:id:UNIT`: any unit name (the shape checks of [`Selector`] apply).
    fn check(&self, selector: &Selector) -> Result<(), SelectorError> {
        if selector.kind() != TYPE {
            return Err(SelectorError::UnknownType {
                selector: selector.to_string(),
                known: known_list([TYPE]),
            });
        }
        match selector.key() {
            "id" => Ok(()),
            _ => Err(SelectorError::UnknownKey {
                selector: selector.to_string(),
                known: keys_sentence(TYPE, KEYS),
            }),
        }
    }

    async fn attest(&self, peer: &PeerCred, needs: &Needs) -> Result<PluginAttested, AttestError> {
        let mut got = PluginAttested::default();
        let Some(pid) = peer.pid else {
            // Another PID namespace: its /proc/PID (if any) is some other process.
            return Ok(got);
        };
        if !needs.wants("systemd:id") {
            return Ok(got);
        }
        let proc = Pinned {
            pid,
            uid: peer.uid,
            pidfd: peer.pidfd.as_deref(),
            denied_log: &self.denied_log,
        };
        if let Some(text) = proc.read_or_leave_out("cgroup", &["systemd:id"], &mut got.left_out)?
            && let Some(unit) = systemd_unit_from_cgroup(&text)
        {
            match Selector::new(TYPE, &format!("id:{unit}")) {
                Ok(s) => got.selectors.push(s),
                Err(error) => tracing::debug!(%error, "skipping selector"),
            }
        }
        // What was read describes the caller only if the process that connected is still the
        // one running as PID.
        proc.still_the_caller()?;
        Ok(got)
    }
}

/// The systemd unit (`web.service`, `app-foo-123.scope`) named by the text of a
/// `/proc/PID/cgroup` file, or `None` when the process is in no unit.
///
/// The unit is the deepest path segment ending in `.service` or `.scope`, so a process in a
/// user session's app scope gets that scope and not `user@1000.service`, and a process in a
/// sub-cgroup a service created for itself still gets the service. The cgroup v2 line (`0::`)
/// is used when it names a unit; otherwise the v1 `name=systemd` line, then any other line.
pub fn systemd_unit_from_cgroup(text: &str) -> Option<String> {
    // Each line is `HIERARCHY-ID:CONTROLLERS:PATH`; the path may itself contain ':'.
    let lines: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| {
            let (id, rest) = line.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            Some((if id == "0" { "" } else { controllers }, path))
        })
        .collect();
    let v2 = lines.iter().filter(|(c, _)| c.is_empty());
    let named = lines.iter().filter(|(c, _)| *c == "name=systemd");
    let rest = lines
        .iter()
        .filter(|(c, _)| !c.is_empty() && *c != "name=systemd");
    v2.chain(named)
        .chain(rest)
        .find_map(|(_, path)| deepest_unit(path))
        .map(str::to_owned)
}

fn deepest_unit(path: &str) -> Option<&str> {
    path.trim_end()
        .rsplit('/')
        .find(|seg| unit_name(seg, ".service") || unit_name(seg, ".scope"))
}

fn unit_name(segment: &str, suffix: &str) -> bool {
    segment.len() > suffix.len() && segment.ends_with(suffix)
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;

    use super::*;
    use crate::sys;

    fn cred_of(pid: u32, pidfd_of: u32) -> PeerCred {
        PeerCred {
            pid: Some(pid),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            pidfd: Some(Arc::new(sys::pidfd_open(pidfd_of).unwrap())),
        }
    }

    #[tokio::test]
    async fn attests_the_unit_of_a_live_caller() {
        let me = std::process::id();
        let cred = cred_of(me, me);
        let plugin = SystemdPlugin::new();
        let want = systemd_unit_from_cgroup(&crate::procfs::read(me, "cgroup").unwrap());
        let got = plugin.attest(&cred, &Needs::everything()).await.unwrap();
        let units: Vec<String> = got.selectors.iter().map(ToString::to_string).collect();
        assert_eq!(
            units,
            want.map(|u| format!("systemd:id:{u}"))
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert!(got.left_out.is_empty());
        assert_eq!(got.exe, None);

        // Not needed, or no pid to read: nothing read, nothing found.
        let unix_only: Needs = ["unix:uid"].into_iter().collect();
        assert_eq!(
            plugin.attest(&cred, &unix_only).await.unwrap(),
            PluginAttested::default()
        );
        let no_pid = PeerCred { pid: None, ..cred };
        assert_eq!(
            plugin.attest(&no_pid, &Needs::everything()).await.unwrap(),
            PluginAttested::default()
        );
    }

    /// The pidfd pins another process than the one `/proc/PID` shows: the cgroup read is not
    /// the caller's.
    #[tokio::test]
    async fn a_reused_pid_is_gone() {
        let me = std::process::id();
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let cred = cred_of(me, other.id());
        let got = SystemdPlugin::new()
            .attest(&cred, &Needs::everything())
            .await;
        other.kill().unwrap();
        other.wait().unwrap();
        match got {
            Err(e @ AttestError::ProcessGone { pid }) => {
                assert_eq!(pid, me);
                assert!(e.is_fatal());
            }
            other => panic!("expected ProcessGone, got {other:?}"),
        }
    }

    #[test]
    fn checks_its_keys() {
        let plugin = SystemdPlugin::new();
        assert!(
            plugin
                .check(&"systemd:id:web.service".parse().unwrap())
                .is_ok()
        );
        let e = plugin
            .check(&"systemd:unit:web.service".parse().unwrap())
            .unwrap_err();
        assert!(matches!(e, SelectorError::UnknownKey { .. }));
        assert_eq!(
            e.to_string(),
            "selector \"systemd:unit:web.service\" has an unknown key; known keys are systemd:id"
        );
        assert!(matches!(
            plugin.check(&"unix:uid:1".parse().unwrap()),
            Err(SelectorError::UnknownType { .. })
        ));
    }

    #[test]
    fn system_service() {
        assert_eq!(
            systemd_unit_from_cgroup("0::/system.slice/web.service\n").as_deref(),
            Some("web.service")
        );
    }

    #[test]
    fn user_app_scope_is_deeper_than_the_user_manager() {
        assert_eq!(
            systemd_unit_from_cgroup(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo-123.scope\n"
            )
            .as_deref(),
            Some("app-foo-123.scope")
        );
    }

    #[test]
    fn sub_cgroup_of_a_service_gets_the_service() {
        assert_eq!(
            systemd_unit_from_cgroup("0::/system.slice/docker.service/payload\n").as_deref(),
            Some("docker.service")
        );
    }

    #[test]
    fn root_and_slices_are_no_unit() {
        assert_eq!(systemd_unit_from_cgroup("0::/\n"), None);
        assert_eq!(systemd_unit_from_cgroup("0::/user.slice\n"), None);
        assert_eq!(systemd_unit_from_cgroup(""), None);
        assert_eq!(systemd_unit_from_cgroup("0::/weird/.service\n"), None);
    }

    #[test]
    fn cgroup_v1_uses_the_systemd_hierarchy() {
        let v1 = "12:pids:/system.slice/db.service\n\
                  11:memory:/system.slice/db.service\n\
                  4:cpu,cpuacct:/\n\
                  1:name=systemd:/system.slice/db.service\n";
        assert_eq!(systemd_unit_from_cgroup(v1).as_deref(), Some("db.service"));

        // A controller hierarchy that is only partly set up still names the unit.
        let only_controllers = "9:name=systemd:/\n4:memory:/system.slice/cron.service\n";
        assert_eq!(
            systemd_unit_from_cgroup(only_controllers).as_deref(),
            Some("cron.service")
        );
    }

    #[test]
    fn hybrid_prefers_the_v2_line_and_falls_back_to_v1() {
        let hybrid = "1:name=systemd:/system.slice/old.service\n0::/system.slice/new.service\n";
        assert_eq!(
            systemd_unit_from_cgroup(hybrid).as_deref(),
            Some("new.service")
        );
        let empty_v2 = "1:name=systemd:/system.slice/ssh.service\n0::/\n";
        assert_eq!(
            systemd_unit_from_cgroup(empty_v2).as_deref(),
            Some("ssh.service")
        );
    }
}
