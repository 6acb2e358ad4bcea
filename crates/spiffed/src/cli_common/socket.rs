//! Reaching an agent's Unix socket: what can go wrong, and a message that says what to do.
//!
//! Both sockets fail the same ways (nothing there, not a socket, no access, nobody listening,
//! no answer in time), so there is one [`SocketError`]; [`Api`] says which socket it was, and
//! with it the flag, the config key and the fix the message names. Every socket error ends the
//! command with exit status 1.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which of the agent's sockets a command talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// The Workload API socket (`spiffed api ...`, `spiffed healthcheck`).
    Workload,
    /// The admin socket (`spiffed entry ...`, `spiffed explain`).
    Admin,
}

impl Api {
    /// What sits at the socket path, for "no ... at PATH".
    fn socket_name(self) -> &'static str {
        match self {
            Self::Workload => "Workload API socket",
            Self::Admin => "admin socket",
        }
    }

    /// Where the right path comes from, for a missing socket.
    fn where_to_look(self) -> &'static str {
        match self {
            Self::Workload => "`spiffed dev` prints the socket to export",
            Self::Admin => "see admin_socket_path in its config",
        }
    }

    /// The socket and the flag that names it, for a path that is not a socket.
    fn flag(self) -> &'static str {
        match self {
            Self::Workload => "socket with --socket",
            Self::Admin => "admin socket with --admin-socket",
        }
    }

    /// Who may connect, for a denied connection.
    fn who_may_connect(self) -> &'static str {
        match self {
            Self::Workload => {
                "the socket's mode or its directory does not let this user in (see socket_mode \
                 in the agent's config)"
            }
            Self::Admin => "the admin socket is for the agent's uid and admin_uids",
        }
    }

    /// What answers on the socket, for "cannot connect to the ..." and "no answer from the ...".
    fn server_name(self) -> &'static str {
        match self {
            Self::Workload => "Workload API",
            Self::Admin => "admin socket",
        }
    }

    /// What to do when the agent does not answer in time.
    fn when_slow(self) -> &'static str {
        match self {
            Self::Workload => "raise --timeout or check the agent's logs",
            Self::Admin => "check the agent's logs",
        }
    }
}

/// Why a command could not talk to the agent's socket. Each message names the socket and the
/// fix.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketError {
    /// Nothing exists at the socket path (or a directory on the way is missing or a file).
    #[error(
        "no {} at {}: is spiffed running? ({})",
        api.socket_name(),
        path.display(),
        api.where_to_look()
    )]
    NoSocket {
        /// Which socket.
        api: Api,
        /// The socket path.
        path: PathBuf,
    },

    /// Something other than a socket exists at the socket path.
    #[error("{} is not a socket: pass the agent's {}", path.display(), api.flag())]
    NotASocket {
        /// Which socket.
        api: Api,
        /// The path.
        path: PathBuf,
    },

    /// The socket (or a directory on its path) does not let this user connect.
    #[error(
        "permission denied connecting to {} as uid {uid}: {}",
        path.display(),
        api.who_may_connect()
    )]
    AccessDenied {
        /// Which socket.
        api: Api,
        /// The socket path.
        path: PathBuf,
        /// This process's uid.
        uid: u32,
    },

    /// The socket exists but nothing accepts connections on it.
    #[error(
        "nothing accepts connections on {} (a stale socket file?): is spiffed running?",
        path.display()
    )]
    NotListening {
        /// Which socket.
        api: Api,
        /// The socket path.
        path: PathBuf,
    },

    /// No answer within the time the command waits.
    #[error(
        "no answer from the {} at {} within {}: {}",
        api.server_name(),
        path.display(),
        humantime::format_duration(*after),
        api.when_slow()
    )]
    Timeout {
        /// Which socket.
        api: Api,
        /// The socket path.
        path: PathBuf,
        /// The time that passed.
        after: Duration,
    },

    /// Connecting failed for another reason.
    #[error("cannot connect to the {} at {}: {source}", api.server_name(), path.display())]
    Connect {
        /// Which socket.
        api: Api,
        /// The socket path.
        path: PathBuf,
        /// What the transport said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SocketError {
    /// Classifies an I/O error of reaching the socket at `path`; `None` for a kind that says
    /// nothing about the socket.
    pub(crate) fn from_io(api: Api, path: &Path, err: &std::io::Error) -> Option<Self> {
        use std::io::ErrorKind;
        let path = path.to_path_buf();
        match err.kind() {
            ErrorKind::NotFound | ErrorKind::NotADirectory => Some(Self::NoSocket { api, path }),
            ErrorKind::PermissionDenied => Some(Self::AccessDenied {
                api,
                path,
                uid: my_uid(),
            }),
            ErrorKind::ConnectionRefused => Some(Self::NotListening { api, path }),
            _ => None,
        }
    }

    /// Classifies a failed connection by the first I/O error in its source chain, or keeps it
    /// as [`SocketError::Connect`].
    pub(crate) fn from_connect<E>(api: Api, path: &Path, err: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        find_io_error(&err)
            .and_then(|io| Self::from_io(api, path, io))
            .unwrap_or_else(|| Self::Connect {
                api,
                path: path.to_path_buf(),
                source: Box::new(err),
            })
    }
}

/// Checks the socket path before connecting, so a missing agent or a wrong path gets a clear
/// message rather than a transport error.
pub(crate) fn check_socket_file(api: Api, path: &Path) -> Result<(), SocketError> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(SocketError::NotASocket {
            api,
            path: path.to_path_buf(),
        }),
        Ok(_) => Ok(()),
        // Another kind is left to the connection, which reports it with its own words.
        Err(e) => SocketError::from_io(api, path, &e).map_or(Ok(()), Err),
    }
}

/// The first `std::io::Error` in an error's source chain, if any.
pub(crate) fn find_io_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a std::io::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// The real uid of this process, for messages.
pub(crate) fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

#[cfg(test)]
mod tests {
    use std::process::ExitCode;

    use super::*;
    use crate::cli_common::{Failure as _, fail};

    const BOTH: [Api; 2] = [Api::Workload, Api::Admin];

    /// The variant `err` classifies as, by name; "" for none.
    fn classify(err: &std::io::Error) -> &'static str {
        match SocketError::from_io(Api::Workload, Path::new("/run/x.sock"), err) {
            None => "",
            Some(e) => {
                assert_eq!(e.exit_code(), ExitCode::FAILURE, "{e:?}");
                match e {
                    SocketError::NoSocket { .. } => "NoSocket",
                    SocketError::NotASocket { .. } => "NotASocket",
                    SocketError::AccessDenied { uid, .. } => {
                        assert_eq!(uid, my_uid());
                        "AccessDenied"
                    }
                    SocketError::NotListening { .. } => "NotListening",
                    SocketError::Timeout { .. } => "Timeout",
                    SocketError::Connect { .. } => "Connect",
                }
            }
        }
    }

    #[test]
    fn io_kinds_become_the_matching_socket_error() {
        use std::io::ErrorKind;
        for (kind, want) in [
            (ErrorKind::NotFound, "NoSocket"),
            (ErrorKind::NotADirectory, "NoSocket"),
            (ErrorKind::PermissionDenied, "AccessDenied"),
            (ErrorKind::ConnectionRefused, "NotListening"),
            (ErrorKind::ConnectionReset, ""),
            (ErrorKind::BrokenPipe, ""),
            (ErrorKind::WouldBlock, ""),
            (ErrorKind::TimedOut, ""),
            (ErrorKind::Other, ""),
        ] {
            assert_eq!(classify(&std::io::Error::from(kind)), want, "{kind:?}");
        }
    }

    #[test]
    fn raw_errnos_from_connect_become_the_matching_socket_error() {
        for (errno, want) in [
            (libc_errno::ENOENT, "NoSocket"),
            (libc_errno::ENOTDIR, "NoSocket"),
            (libc_errno::EACCES, "AccessDenied"),
            (libc_errno::EPERM, "AccessDenied"),
            (libc_errno::ECONNREFUSED, "NotListening"),
            (libc_errno::ECONNRESET, ""),
            (libc_errno::EAGAIN, ""),
        ] {
            let err = std::io::Error::from_raw_os_error(errno);
            assert_eq!(classify(&err), want, "errno {errno}");
        }
    }

    /// Linux errno values, so that the test reads like the man page.
    mod libc_errno {
        pub(super) const EPERM: i32 = 1;
        pub(super) const ENOENT: i32 = 2;
        pub(super) const EAGAIN: i32 = 11;
        pub(super) const EACCES: i32 = 13;
        pub(super) const ENOTDIR: i32 = 20;
        pub(super) const ECONNRESET: i32 = 104;
        pub(super) const ECONNREFUSED: i32 = 111;
    }

    #[test]
    fn messages_name_the_socket_and_the_fix() {
        let path = PathBuf::from("/run/x.sock");
        let msg =
            |api: Api, make: fn(Api, PathBuf) -> SocketError| make(api, path.clone()).to_string();
        assert_eq!(
            msg(Api::Workload, |api, path| SocketError::NoSocket {
                api,
                path
            }),
            "no Workload API socket at /run/x.sock: is spiffed running? (`spiffed dev` prints \
             the socket to export)"
        );
        assert_eq!(
            msg(Api::Admin, |api, path| SocketError::NoSocket { api, path }),
            "no admin socket at /run/x.sock: is spiffed running? (see admin_socket_path in its \
             config)"
        );
        assert_eq!(
            msg(Api::Workload, |api, path| SocketError::NotASocket {
                api,
                path
            }),
            "/run/x.sock is not a socket: pass the agent's socket with --socket"
        );
        assert_eq!(
            msg(Api::Admin, |api, path| SocketError::NotASocket {
                api,
                path
            }),
            "/run/x.sock is not a socket: pass the agent's admin socket with --admin-socket"
        );
        assert_eq!(
            msg(Api::Workload, |api, path| SocketError::AccessDenied {
                api,
                path,
                uid: 7
            }),
            "permission denied connecting to /run/x.sock as uid 7: the socket's mode or its \
             directory does not let this user in (see socket_mode in the agent's config)"
        );
        assert_eq!(
            msg(Api::Admin, |api, path| SocketError::AccessDenied {
                api,
                path,
                uid: 7
            }),
            "permission denied connecting to /run/x.sock as uid 7: the admin socket is for the \
             agent's uid and admin_uids"
        );
        for api in BOTH {
            assert_eq!(
                msg(api, |api, path| SocketError::NotListening { api, path }),
                "nothing accepts connections on /run/x.sock (a stale socket file?): is spiffed \
                 running?"
            );
        }
        let timeout = |api| SocketError::Timeout {
            api,
            path: path.clone(),
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            timeout(Api::Workload).to_string(),
            "no answer from the Workload API at /run/x.sock within 1s 500ms: raise --timeout or \
             check the agent's logs"
        );
        assert_eq!(
            timeout(Api::Admin).to_string(),
            "no answer from the admin socket at /run/x.sock within 1s 500ms: check the agent's \
             logs"
        );
    }

    /// An error whose source is an I/O error, as transports wrap them.
    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Wrapped(#[source] std::io::Error);

    #[test]
    fn a_connection_failure_is_classified_by_the_io_error_in_its_chain() {
        let path = Path::new("/run/x.sock");
        let refused = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(
            SocketError::from_connect(Api::Admin, path, refused),
            SocketError::NotListening {
                api: Api::Admin,
                ..
            }
        ));
        // Nothing to classify: the transport's own words.
        let reset = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let other = SocketError::from_connect(Api::Admin, path, reset);
        assert!(matches!(other, SocketError::Connect { .. }), "{other:?}");
        assert_eq!(
            other.to_string(),
            "cannot connect to the admin socket at /run/x.sock: transport error"
        );
        let other = SocketError::from_connect(Api::Workload, path, std::fmt::Error);
        assert_eq!(
            other.to_string(),
            "cannot connect to the Workload API at /run/x.sock: an error occurred when \
             formatting an argument"
        );
        assert_eq!(fail(&other), ExitCode::FAILURE);
    }

    #[test]
    fn the_socket_file_is_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        for api in BOTH {
            check_socket_file(api, &sock).unwrap();
            assert!(matches!(
                check_socket_file(api, &dir.path().join("missing.sock")),
                Err(SocketError::NoSocket { .. })
            ));
            assert!(matches!(
                check_socket_file(api, &file.join("under-a-file.sock")),
                Err(SocketError::NoSocket { .. })
            ));
            assert!(matches!(
                check_socket_file(api, &file),
                Err(SocketError::NotASocket { .. })
            ));
            assert!(matches!(
                check_socket_file(api, dir.path()),
                Err(SocketError::NotASocket { .. })
            ));
        }
    }
}
