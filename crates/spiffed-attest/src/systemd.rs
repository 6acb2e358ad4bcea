//! The systemd unit a process runs in, from its `/proc/PID/cgroup`.

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
    use super::*;

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
