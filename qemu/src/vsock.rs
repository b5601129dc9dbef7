//! vsock for guests on hosts without `/dev/vhost-vsock`: a `vhost-device-vsock` daemon per VM
//! (a Rust package; `make setup` installs it with cargo) serves QEMU's `vhost-user-vsock-pci` device
//! and maps the guest's vsock to **hybrid vsock** Unix sockets on the host.
//!
//! Layout of a [`VsockSpec::dir`] (all paths are fixed, so a caller knows them before the VM
//! starts):
//! - `DIR/vhost.sock` — the daemon's vhost-user control socket; QEMU connects to it.
//! - `DIR/vsock` — the hybrid base path ([`VsockSpec::uds_path`]). The daemon listens here for
//!   host-initiated connections (`CONNECT <port>\n`, the hybrid-vsock convention).
//! - `DIR/vsock_<P>` — a guest connection to host CID 2, port P arrives here. The host program
//!   must already be listening on it ([`VsockSpec::port_path`]); bind it before calling
//!   [`crate::run`], and remove it yourself: the daemon guard removes only the first two.
//!
//! The QEMU side ([`vsock_qemu_args`]) needs the guest memory in a shared memfd backend, which
//! [`crate::qemu_args`] selects (`-machine q35,memory-backend=mem`) whenever vsock is on.

use std::ffi::OsString;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The daemon's program name (and the Rust package `make setup` installs).
pub const DAEMON: &str = "vhost-device-vsock";
/// The environment variable that names the daemon binary, ahead of `PATH` and `~/.cargo/bin`.
pub const DAEMON_ENV: &str = "BOOTLACE_VHOST_DEVICE_VSOCK";
/// The guest CID used unless asked otherwise (0-2 are reserved: hypervisor, local, host).
pub const DEFAULT_GUEST_CID: u32 = 3;
/// The host's CID, which a guest dials.
pub const HOST_CID: u32 = 2;
/// How long the daemon may take to listen on its control socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);
/// The QEMU object id of the shared guest memory backend.
pub const MEMORY_BACKEND_ID: &str = "mem";

/// Longest Unix socket path (`sun_path` is 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The longest suffix a port listener adds to the uds path (`_4294967295`).
const MAX_PORT_SUFFIX: usize = 11;

/// vsock for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    /// The guest's CID (default 3; must be 3 or more).
    pub guest_cid: u32,
    /// Where the sockets live (created if missing; never removed by this crate).
    pub dir: PathBuf,
}

impl VsockSpec {
    /// vsock with the default guest CID and its sockets in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        VsockSpec {
            guest_cid: DEFAULT_GUEST_CID,
            dir: dir.into(),
        }
    }

    /// The vhost-user control socket QEMU connects to: `DIR/vhost.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("vhost.sock")
    }

    /// The hybrid-vsock base path `DIR/vsock`: a guest connection to host port P arrives on
    /// `<uds_path>_P` ([`Self::port_path`]).
    pub fn uds_path(&self) -> PathBuf {
        self.dir.join("vsock")
    }

    /// Where a host program listens for guest connections to host port `port`:
    /// `DIR/vsock_<port>`. Bind it before the guest boots.
    pub fn port_path(&self, port: u32) -> PathBuf {
        port_path(&self.uds_path(), port)
    }
}

/// The hybrid-vsock listener path for `port` under `uds_path`: `<uds_path>_<port>` (the
/// host agent's own [`hybrid_path`](bootlace_agent::host::hybrid_path)).
pub use bootlace_agent::host::hybrid_path as port_path;

/// The daemon's arguments for `spec` (separate flags; v0.3.0 also accepts the same as one
/// `--vm guest-cid=N,socket=…,uds-path=…`, which cannot carry a `,` in a path).
pub fn daemon_args(spec: &VsockSpec) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        spec.guest_cid.to_string().into(),
        "--socket".into(),
        spec.control_socket().into_os_string(),
        "--uds-path".into(),
        spec.uds_path().into_os_string(),
    ]
}

/// The QEMU arguments for a vhost-user vsock device served on `control_socket`, with the guest
/// memory (`memory_mib`, the same as `-m`) in a shared memfd backend. The machine must name the
/// backend: `-machine q35,memory-backend=mem` ([`MEMORY_BACKEND_ID`]); [`crate::qemu_args`]
/// does that.
pub fn vsock_qemu_args(control_socket: &Path, memory_mib: u32) -> Vec<String> {
    vec![
        "-object".to_owned(),
        format!("memory-backend-memfd,id={MEMORY_BACKEND_ID},size={memory_mib}M,share=on"),
        "-chardev".to_owned(),
        format!(
            "socket,id=vsock0,path={}",
            control_socket.to_string_lossy().replace(',', ",,")
        ),
        "-device".to_owned(),
        "vhost-user-vsock-pci,chardev=vsock0".to_owned(),
    ]
}

/// Why the vsock daemon could not serve a VM.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The daemon binary is nowhere to be found.
    #[error(
        "{DAEMON} not found (looked at ${DAEMON_ENV}, PATH and ~/.cargo/bin): run `make setup`, \
         which installs it (cargo install {DAEMON} --locked)"
    )]
    NotFound,
    /// `$BOOTLACE_VHOST_DEVICE_VSOCK` names something that is not an executable file.
    #[error("${DAEMON_ENV}={}: not an executable file", .0.display())]
    BadOverride(PathBuf),
    /// The guest CID is reserved or out of range.
    #[error("guest CID {0} is invalid: 0-2 are reserved and {max} is VMADDR_CID_ANY", max = u32::MAX)]
    BadCid(u32),
    /// A socket path would be too long for `sun_path`.
    #[error(
        "vsock socket path {} is too long for a Unix socket (listeners add up to \
         {MAX_PORT_SUFFIX} bytes; the limit is {MAX_SOCKET_PATH}): use a shorter directory",
        .0.display()
    )]
    PathTooLong(PathBuf),
    /// The socket directory could not be prepared.
    #[error("vsock directory {}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// One of the daemon's socket paths is taken.
    #[error("{}: {why}", path.display())]
    InTheWay {
        /// The path.
        path: PathBuf,
        /// What is there.
        why: &'static str,
    },
    /// The daemon could not be started.
    #[error("cannot start {}", binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The daemon exited before it listened.
    #[error("{} exited at start ({status}): {}", binary.display(), or_none(stderr))]
    Exited {
        /// The binary.
        binary: PathBuf,
        /// How it ended.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// The daemon did not listen on its control socket in time.
    #[error(
        "{} did not listen on {} within {} s: {}",
        binary.display(),
        socket.display(),
        START_TIMEOUT.as_secs(),
        or_none(stderr)
    )]
    NotListening {
        /// The binary.
        binary: PathBuf,
        /// The control socket.
        socket: PathBuf,
        /// Its stderr so far.
        stderr: String,
    },
}

fn or_none(stderr: &str) -> &str {
    match stderr.trim() {
        "" => "(no stderr)",
        s => s,
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds the daemon: `$BOOTLACE_VHOST_DEVICE_VSOCK`, else `PATH`, else `$CARGO_HOME/bin` and
/// `~/.cargo/bin`.
pub fn find_daemon() -> Result<PathBuf, VsockError> {
    if let Some(p) = std::env::var_os(DAEMON_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(VsockError::BadOverride(p))
        };
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_dirs = [
        std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin")),
    ];
    path_dirs
        .into_iter()
        .chain(cargo_dirs.into_iter().flatten())
        .map(|d| d.join(DAEMON))
        .find(|p| is_executable(p))
        .ok_or(VsockError::NotFound)
}

/// Whether a Unix socket is listening on `path` in this network namespace, from
/// `/proc/net/unix` (`None` when that cannot be read). Looking there instead of connecting
/// matters: the daemon serves exactly one vhost-user connection, which must be QEMU's.
fn listening(path: &Path) -> Option<bool> {
    const ACCEPTING: &str = "00010000"; // __SO_ACCEPTCON
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = path.to_str()?;
    Some(table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.splitn(8, ' ').collect();
        f.len() == 8 && f[3] == ACCEPTING && f[7] == want
    }))
}

/// Makes room for a socket the daemon will bind: removes a stale socket file, refuses anything
/// else (a live listener, a regular file, a directory).
fn clear_stale(path: &Path) -> Result<(), VsockError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = path.symlink_metadata() else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(VsockError::InTheWay {
            path: path.to_owned(),
            why: "exists and is not a socket",
        });
    }
    if listening(path) == Some(true) {
        return Err(VsockError::InTheWay {
            path: path.to_owned(),
            why: "another process is listening there (a second VM on the same directory?)",
        });
    }
    std::fs::remove_file(path).map_err(|source| VsockError::Dir {
        dir: path.to_owned(),
        source,
    })
}

/// A running `vhost-device-vsock` serving one VM. Dropping it kills the daemon, reaps it and
/// removes the two sockets it made (`vhost.sock`, `vsock`); port listeners (`vsock_<P>`) belong
/// to the programs that bound them and stay.
#[derive(Debug)]
pub struct VsockDaemon {
    child: Child,
    binary: PathBuf,
    spec: VsockSpec,
    stderr: Arc<Mutex<Vec<u8>>>,
    pump: Option<JoinHandle<()>>,
}

impl VsockDaemon {
    /// Starts the daemon found by [`find_daemon`] and waits (up to [`START_TIMEOUT`]) until it
    /// listens on its control socket.
    pub fn start(spec: &VsockSpec) -> Result<Self, VsockError> {
        let binary = find_daemon()?;
        Self::start_with(&binary, spec)
    }

    /// Starts `binary` as the daemon for `spec`.
    pub fn start_with(binary: &Path, spec: &VsockSpec) -> Result<Self, VsockError> {
        if spec.guest_cid <= HOST_CID || spec.guest_cid == u32::MAX {
            return Err(VsockError::BadCid(spec.guest_cid));
        }
        for p in [spec.control_socket(), spec.uds_path()] {
            if p.as_os_str().len() + MAX_PORT_SUFFIX > MAX_SOCKET_PATH {
                return Err(VsockError::PathTooLong(p));
            }
        }
        std::fs::create_dir_all(&spec.dir).map_err(|source| VsockError::Dir {
            dir: spec.dir.clone(),
            source,
        })?;
        clear_stale(&spec.control_socket())?;
        clear_stale(&spec.uds_path())?;
        let mut child = Command::new(binary)
            .args(daemon_args(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| VsockError::Spawn {
                binary: binary.to_owned(),
                source,
            })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pump = child.stderr.take().map(|mut src| {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = src.read(&mut buf) {
                    if let Ok(mut s) = sink.lock() {
                        s.extend_from_slice(&buf[..n]);
                    }
                }
            })
        });
        // From here on, every early return kills and cleans up through Drop.
        let mut daemon = VsockDaemon {
            child,
            binary: binary.to_owned(),
            spec: spec.clone(),
            stderr,
            pump,
        };
        daemon.wait_listening()?;
        Ok(daemon)
    }

    fn wait_listening(&mut self) -> Result<(), VsockError> {
        let socket = self.spec.control_socket();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(p) = self.pump.take() {
                    let _ = p.join();
                }
                return Err(VsockError::Exited {
                    binary: self.binary.clone(),
                    status,
                    stderr: self.stderr(),
                });
            }
            // Without /proc, the socket file appearing is the best sign there is.
            if listening(&socket).unwrap_or_else(|| socket.exists()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VsockError::NotListening {
                    binary: self.binary.clone(),
                    socket,
                    stderr: self.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The hybrid-vsock base path: a guest connection to host port P arrives on `<this>_P`.
    pub fn uds_path(&self) -> PathBuf {
        self.spec.uds_path()
    }

    /// The vhost-user control socket for QEMU's `-chardev socket,path=…`.
    pub fn control_socket(&self) -> PathBuf {
        self.spec.control_socket()
    }

    /// The spec the daemon serves.
    pub fn spec(&self) -> &VsockSpec {
        &self.spec
    }

    /// The daemon binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for VsockDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        let _ = std::fs::remove_file(self.spec.control_socket());
        let _ = std::fs::remove_file(self.spec.uds_path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_fixed_by_the_dir() {
        let spec = VsockSpec::new("/run/vm1");
        assert_eq!(spec.guest_cid, 3);
        assert_eq!(spec.control_socket(), Path::new("/run/vm1/vhost.sock"));
        assert_eq!(spec.uds_path(), Path::new("/run/vm1/vsock"));
        assert_eq!(spec.port_path(1024), Path::new("/run/vm1/vsock_1024"));
        assert_eq!(
            port_path(Path::new("/x/v.sock"), 7),
            Path::new("/x/v.sock_7")
        );
    }

    #[test]
    fn daemon_arguments() {
        let mut spec = VsockSpec::new("/run/vm1");
        spec.guest_cid = 42;
        let args: Vec<String> = daemon_args(&spec)
            .into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect();
        assert_eq!(
            args.join(" "),
            "--guest-cid 42 --socket /run/vm1/vhost.sock --uds-path /run/vm1/vsock"
        );
    }

    #[test]
    fn qemu_arguments() {
        let args = vsock_qemu_args(Path::new("/run/a,b/vhost.sock"), 512);
        assert_eq!(
            args,
            [
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-chardev",
                "socket,id=vsock0,path=/run/a,,b/vhost.sock",
                "-device",
                "vhost-user-vsock-pci,chardev=vsock0",
            ]
        );
    }

    #[test]
    fn bad_specs_are_refused_before_anything_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = VsockSpec::new(dir.path());
        spec.guest_cid = 2;
        let err = VsockDaemon::start_with(Path::new("/bin/false"), &spec).expect_err("cid");
        assert!(matches!(err, VsockError::BadCid(2)), "{err}");

        let long = dir.path().join("d".repeat(100));
        let err =
            VsockDaemon::start_with(Path::new("/bin/false"), &VsockSpec::new(long)).expect_err("");
        assert!(matches!(err, VsockError::PathTooLong(_)), "{err}");

        std::fs::write(dir.path().join("vsock"), "").expect("write");
        let err = VsockDaemon::start_with(Path::new("/bin/false"), &VsockSpec::new(dir.path()))
            .expect_err("in the way");
        assert!(
            err.to_string().ends_with("exists and is not a socket"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_daemon_points_at_make_setup() {
        let msg = VsockError::NotFound.to_string();
        assert!(msg.starts_with("vhost-device-vsock not found"), "{msg}");
        assert!(msg.contains("run `make setup`"), "{msg}");
    }

    #[test]
    fn a_daemon_that_dies_at_start_is_reported_with_its_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("fake-daemon");
        std::fs::write(&fake, "#!/bin/sh\necho 'cannot bind: no way' >&2\nexit 3\n").expect("w");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let err = VsockDaemon::start_with(&fake, &VsockSpec::new(dir.path().join("s")))
            .expect_err("exits");
        let msg = err.to_string();
        assert!(msg.contains("fake-daemon exited at start"), "{msg}");
        assert!(msg.contains("cannot bind: no way"), "{msg}");
    }
}
