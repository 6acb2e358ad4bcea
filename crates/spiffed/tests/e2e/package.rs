//! The Debian package (`packaging/build-deb.sh`): built, installed with `dpkg -i` on this
//! machine, its layout checked (binary, unit, conffile, man pages, completions, user, data
//! dir), its binary checked (glibc floor, stripped, debug info split off), the installed agent
//! run as its unit runs it and a workload served, the unit verified by `systemd-analyze`, and
//! the package purged, also when a check fails.
//!
//! Must run as root (dpkg, setpriv, mount namespaces), as CI does. The build has its own
//! target dir outside the checkout (`~/.cache/spiffed-pkg/target`), so it does not wait for
//! the lock of the test build; it takes minutes when cold.

use spiffed_test_support::run_ok;
use spiffed_test_support::spire::repo_root;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The newest glibc the packaged binary may need (Debian 11).
const GLIBC_FLOOR: (u32, u32) = (2, 31);
/// A uid with an entry in the installed agent (no account needed).
const WORKLOAD_UID: u32 = 4242;

fn stdout_ok(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// Purges the packages when dropped: the machine is left as it was, whatever failed.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let out = Command::new("dpkg")
            .args(["--purge", "spiffed-dbgsym", "spiffed"])
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            let _ = writeln!(
                std::io::stderr(),
                "package test: dpkg --purge failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The installed agent, in a mount namespace of its own; killed and reaped when dropped.
struct InstalledAgent {
    child: Child,
    log: PathBuf,
}

impl InstalledAgent {
    /// Runs `args` inside the agent's mount namespace (as root, or as `uid` through setpriv):
    /// there `/run/spiffed` and `/var/lib/spiffed` are the agent's.
    fn nsenter(&self, uid: Option<u32>, args: &[&str]) -> Command {
        self.nsenter_exe(uid, Path::new("/usr/bin/spiffed"), args)
    }

    /// [`InstalledAgent::nsenter`] with another copy of spiffed.
    fn nsenter_exe(&self, uid: Option<u32>, exe: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.child.id()));
        if let Some(uid) = uid {
            c.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ]);
        }
        c.arg(exe).args(args);
        c
    }

    fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for InstalledAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The highest `GLIBC_x.y[.z]` version `readelf --version-info` lists for `bin`.
fn max_glibc(bin: &Path) -> (u32, u32) {
    let text = stdout_ok(
        Command::new("readelf")
            .args(["--version-info", "-W"])
            .arg(bin),
    );
    text.split(|c: char| c.is_whitespace())
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .expect("the binary needs some GLIBC_ version")
}

fn sections(file: &Path) -> String {
    stdout_ok(Command::new("readelf").args(["-S", "-W"]).arg(file))
}

fn build_id(file: &Path) -> String {
    let notes = stdout_ok(Command::new("readelf").arg("-n").arg(file));
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("a build ID note")
        .trim()
        .to_owned()
}

#[test]
fn debian_package_builds_installs_serves_and_purges() {
    assert_eq!(
        spiffed_test_support::my_uid(),
        0,
        "this test installs the Debian package with dpkg (and runs the agent as the unit's user \
         with setpriv) and must run as root"
    );
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "spiffed"])
        .output()
        .expect("dpkg-query runs");
    assert!(
        !String::from_utf8_lossy(&status.stdout).contains("installed"),
        "a spiffed package is already installed on this machine; this test would replace and \
         purge it: `dpkg --purge spiffed-dbgsym spiffed` first"
    );

    // Build: the script prints the .deb's path last.
    let home = std::env::var_os("HOME").expect("HOME is set");
    let out_dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let built = stdout_ok(
        Command::new(repo_root().join("packaging/build-deb.sh"))
            .arg(out_dir.path())
            .env(
                "SPIFFED_PKG_TARGET_DIR",
                Path::new(&home).join(".cache/spiffed-pkg/target"),
            )
            .stderr(Stdio::inherit()),
    );
    eprintln!("package test: built in {:?}", started.elapsed());
    let deb = PathBuf::from(built.lines().last().expect("the script prints the .deb"));
    assert!(deb.is_file(), "{}", deb.display());
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let dbgsym = out_dir
        .path()
        .join(name.replacen("spiffed_", "spiffed-dbgsym_", 1));
    assert!(dbgsym.is_file(), "{}", dbgsym.display());
    let debug_file = out_dir.path().join("spiffed.debug");
    assert!(
        sections(&debug_file).contains(".debug_info"),
        "spiffed.debug has no .debug_info"
    );

    // Install.
    let _purge = Purge;
    run_ok(
        Command::new("dpkg")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("-i")
            .arg(&deb)
            .arg(&dbgsym),
    );

    // The binary: root's, for glibc 2.31, stripped of DWARF but linked to its debug file.
    let bin = Path::new("/usr/bin/spiffed");
    let meta = fs::metadata(bin).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o755));
    let glibc = max_glibc(bin);
    assert!(
        glibc <= GLIBC_FLOOR,
        "/usr/bin/spiffed needs GLIBC_{}.{}, above the floor {GLIBC_FLOOR:?}",
        glibc.0,
        glibc.1
    );
    eprintln!(
        "package test: /usr/bin/spiffed needs at most GLIBC_{}.{}",
        glibc.0, glibc.1
    );
    let bin_sections = sections(bin);
    assert!(!bin_sections.contains(".debug_info"), "{bin_sections}");
    assert!(bin_sections.contains(".gnu_debuglink"), "{bin_sections}");
    let id = build_id(bin);
    let installed_debug = PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &id[..2],
        &id[2..]
    ));
    assert!(
        sections(&installed_debug).contains(".debug_info"),
        "{} has no .debug_info",
        installed_debug.display()
    );
    assert_eq!(build_id(&installed_debug), id);
    assert!(stdout_ok(Command::new(bin).arg("--version")).starts_with("spiffed "));

    // The configuration: a conffile, and the paths the unit prepares.
    let conffiles =
        stdout_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "spiffed"]));
    assert!(
        conffiles.contains("/etc/spiffed/spiffed.toml"),
        "conffiles: {conffiles}"
    );
    let config = fs::read_to_string("/etc/spiffed/spiffed.toml").unwrap();
    for line in [
        "socket_path = \"/run/spiffed/public/api.sock\"",
        "admin_socket_path = \"/run/spiffed/private/admin.sock\"",
        "data_dir = \"/var/lib/spiffed\"",
    ] {
        assert!(config.contains(line), "the default config lacks {line}");
    }

    // The unit, and systemd's own check of it.
    let unit_path = "/usr/lib/systemd/system/spiffed.service";
    let unit = fs::read_to_string(unit_path).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/spiffed run",
        "User=spiffed",
        "RuntimeDirectory=spiffed",
        "StateDirectory=spiffed",
        "AmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", unit_path])
        .output()
        .expect("systemd-analyze runs");
    let verify_err = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !verify_err.contains("spiffed.service"),
        "systemd-analyze verify {unit_path}: {}\n{verify_err}",
        verify.status
    );

    // Man pages and completions, generated from the CLI.
    for page in [
        "spiffed.1.gz",
        "spiffed-run.1.gz",
        "spiffed-entry-create.1.gz",
    ] {
        let path = Path::new("/usr/share/man/man1").join(page);
        let roff = stdout_ok(Command::new("gzip").arg("-dc").arg(&path));
        assert!(
            roff.contains(".TH spiffed"),
            "{}: {roff:.200}",
            path.display()
        );
    }
    let man_run = stdout_ok(
        Command::new("gzip")
            .arg("-dc")
            .arg("/usr/share/man/man1/spiffed-run.1.gz"),
    );
    assert!(man_run.contains("new\\-trust\\-root"), "{man_run}");
    for (path, needle) in [
        (
            "/usr/share/bash-completion/completions/spiffed",
            "complete -F",
        ),
        (
            "/usr/share/zsh/vendor-completions/_spiffed",
            "#compdef spiffed",
        ),
        (
            "/usr/share/fish/vendor_completions.d/spiffed.fish",
            "complete -c spiffed",
        ),
    ] {
        let text = fs::read_to_string(path).unwrap();
        assert!(text.contains(needle), "{path} lacks {needle}");
        assert!(text.contains("healthcheck"), "{path} lacks the subcommands");
    }
    // bash loads the completion and completes a subcommand.
    let words = stdout_ok(Command::new("bash").arg("-c").arg(
        "source /usr/share/bash-completion/completions/spiffed; COMP_WORDS=(spiffed ent); \
         COMP_CWORD=1; COMP_LINE='spiffed ent'; COMP_POINT=11; _spiffed spiffed ent spiffed; \
         printf '%s\\n' \"${COMPREPLY[@]}\"",
    ));
    assert_eq!(words.trim(), "entry");

    // The system user and its data dir.
    let passwd = stdout_ok(Command::new("getent").args(["passwd", "spiffed"]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let spiffed_uid: u32 = fields[2].parse().unwrap();
    let spiffed_gid: u32 = fields[3].parse().unwrap();
    assert!(
        spiffed_uid > 0 && spiffed_uid < 1000,
        "not a system uid: {passwd}"
    );
    assert!(fields[6].ends_with("nologin"), "{passwd}");
    let state = fs::metadata("/var/lib/spiffed").unwrap();
    assert_eq!(
        (state.uid(), state.gid(), state.mode() & 0o7777),
        (spiffed_uid, spiffed_gid, 0o700),
        "/var/lib/spiffed"
    );

    // Run the installed agent as the unit does: `spiffed run` (the default config), as user
    // spiffed with exactly the unit's capabilities, no new privileges, /run/spiffed made as
    // RuntimeDirectory= makes it. In a mount namespace of its own with tmpfs over /run and
    // /var/lib/spiffed, so that it never meets another agent or this host's state.
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("agent.log");
    let caps = "+sys_ptrace,+dac_read_search";
    let script = format!(
        "set -e
         mount --make-rprivate /
         mount -t tmpfs -o mode=0755 tmpfs /run
         install -d -o {spiffed_uid} -g {spiffed_gid} -m 0755 /run/spiffed
         mount -t tmpfs -o mode=0700,uid={spiffed_uid},gid={spiffed_gid} tmpfs /var/lib/spiffed
         exec setpriv --reuid={spiffed_uid} --regid={spiffed_gid} --init-groups \
           --inh-caps=-all,{caps} --ambient-caps=-all,{caps} --bounding-set=-all,{caps} \
           --no-new-privs /usr/bin/spiffed run"
    );
    let agent = InstalledAgent {
        child: Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("unshare runs"),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = agent
            .nsenter(None, &["healthcheck", "--timeout", "1s"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the installed agent did not serve within 30 s:\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It runs as spiffed, holding only the unit's capabilities.
    let status = fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("Uid:"), spiffed_uid.to_string(), "{status}");
    assert_eq!(field("Gid:"), spiffed_gid.to_string(), "{status}");
    // CAP_DAC_READ_SEARCH is bit 2, CAP_SYS_PTRACE bit 19.
    assert_eq!(field("CapEff:"), "0000000000080004", "{status}");
    // The sockets' directories as the agent made them in /run/spiffed.
    let root = format!("/proc/{}/root", agent.child.id());
    for (dir, mode) in [("public", 0o755), ("private", 0o700)] {
        let m = fs::metadata(format!("{root}/run/spiffed/{dir}")).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o7777),
            (spiffed_uid, mode),
            "/run/spiffed/{dir}"
        );
    }

    // root registers a workload over the admin socket (the default path); the entry needs
    // unix:path, which the agent reads from /proc/PID/exe of another uid's process: that
    // takes CAP_SYS_PTRACE.
    run_ok(&mut agent.nsenter(
        None,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/packaged",
            "--selector",
            &format!("unix:uid:{WORKLOAD_UID}"),
            "--selector",
            "unix:path:/usr/bin/spiffed",
        ],
    ));
    // The workload fetches its SVID through the public socket (the default path).
    let out = agent
        .nsenter(Some(WORKLOAD_UID), &["api", "fetch", "x509"])
        .output()
        .unwrap();
    let fetched = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && fetched.contains("spiffe://example.org/packaged"),
        "{}: {fetched}\n{}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.logs()
    );
    // unix:sha256 of an executable the agent's user may not read (0711): hashing it takes
    // CAP_DAC_READ_SEARCH.
    let hidden = tempfile::tempdir().unwrap();
    fs::set_permissions(hidden.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exe = hidden.path().join("workload");
    fs::copy(bin, &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o711)).unwrap();
    let sha = stdout_ok(Command::new("sha256sum").arg(&exe));
    let sha = sha.split_whitespace().next().unwrap();
    run_ok(&mut agent.nsenter(
        None,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/unreadable",
            "--selector",
            &format!("unix:uid:{}", WORKLOAD_UID + 2),
            "--selector",
            &format!("unix:sha256:{sha}"),
        ],
    ));
    let out = agent
        .nsenter_exe(Some(WORKLOAD_UID + 2), &exe, &["api", "fetch", "x509"])
        .output()
        .unwrap();
    let fetched = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && fetched.contains("spiffe://example.org/unreadable"),
        "{}: {fetched}\n{}\nagent log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        agent.logs()
    );
    // Another uid gets nothing.
    let out = agent
        .nsenter(Some(WORKLOAD_UID + 1), &["api", "fetch", "x509"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));
    let mut agent = agent;
    // SIGTERM, as systemctl stop sends it: a clean exit.
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&agent.child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let exit = agent.child.wait().unwrap();
    assert!(exit.success(), "{exit}\n{}", agent.logs());
    drop(agent);

    // Purge removes everything but the system user (kept, as Debian does).
    drop(_purge);
    for path in [
        "/usr/bin/spiffed",
        "/etc/spiffed/spiffed.toml",
        "/var/lib/spiffed",
        unit_path,
    ] {
        assert!(!Path::new(path).exists(), "{path} is left after purge");
    }
}
