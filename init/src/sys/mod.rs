//! The syscall fence: every system call the init makes that std does not wrap goes through
//! here. rustix first; nix where rustix has no safe API (signal sets, signalfd, `kill(-1)`).
//! The only `unsafe` in the crate is in this module, each block with its `SAFETY` reason.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use rustix::mount::MountFlags;

pub use rustix::fs::StatFs;

pub mod root;

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses the module itself.
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;

/// Filesystem magic numbers (`statfs.f_type`) of the early mounts.
pub mod magic {
    /// procfs.
    pub const PROC: i64 = 0x9fa0;
    /// sysfs.
    pub const SYSFS: i64 = 0x6265_6572;
    /// tmpfs (devtmpfs reports this too).
    pub const TMPFS: i64 = 0x0102_1994;
    /// ramfs (the kernel's initramfs "rootfs" when it is not a tmpfs).
    pub const RAMFS: i64 = 0x8584_58f6;
}

/// Whether this process is PID 1.
pub fn is_pid1() -> bool {
    rustix::process::getpid().is_init()
}

/// CLOCK_BOOTTIME: time since the kernel started, including suspend.
pub fn boottime() -> Duration {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The filesystem type magic of the filesystem holding `path`.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let st = rustix::fs::statfs(path)?;
    Ok(st.f_type)
}

/// Mount flags used by the init.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    /// MS_NOSUID.
    pub nosuid: bool,
    /// MS_NODEV.
    pub nodev: bool,
    /// MS_NOEXEC.
    pub noexec: bool,
    /// MS_RDONLY.
    pub rdonly: bool,
}

impl Flags {
    fn bits(self) -> MountFlags {
        let mut f = MountFlags::empty();
        if self.nosuid {
            f |= MountFlags::NOSUID;
        }
        if self.nodev {
            f |= MountFlags::NODEV;
        }
        if self.noexec {
            f |= MountFlags::NOEXEC;
        }
        if self.rdonly {
            f |= MountFlags::RDONLY;
        }
        f
    }
}

/// `mount(2)` of a filesystem.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: Flags,
    data: &CStr,
) -> io::Result<()> {
    rustix::mount::mount(source, target, fstype, flags.bits(), Some(data))?;
    Ok(())
}

/// Loads a kernel module from an open file with `finit_module(2)`.
pub fn finit_module(file: &File, compressed: bool) -> io::Result<()> {
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    rustix::system::finit_module(file, c"", flags)?;
    Ok(())
}

/// Makes ctrl-alt-del send SIGINT to PID 1 instead of rebooting at once.
pub fn disable_ctrl_alt_del() -> io::Result<()> {
    rustix::system::reboot(rustix::system::RebootCommand::CadOff)?;
    Ok(())
}

/// Flushes filesystems and powers the machine off. Never returns: if the kernel refuses, the
/// process sleeps forever rather than exit (an exiting PID 1 panics the kernel).
pub fn power_off() -> ! {
    rustix::fs::sync();
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::PowerOff) {
        log::error!("power-off refused by the kernel: {e}; halting here");
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Flushes all filesystems.
pub fn sync() {
    rustix::fs::sync();
}

/// Marks this process a child subreaper, so orphans of its descendants are reparented to it
/// (a no-op for PID 1, which already adopts every orphan; it matters when run elsewhere).
pub fn set_child_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    Ok(())
}

/// Ensures fds 0, 1 and 2 are open, opening `console` (or `/dev/null`) for any that is not.
pub fn ensure_stdio(console: &Path) -> io::Result<()> {
    let open = |fd: BorrowedFd<'_>| rustix::io::fcntl_getfd(fd).is_ok();
    let all_open = open(rustix::stdio::stdin())
        && open(rustix::stdio::stdout())
        && open(rustix::stdio::stderr());
    if all_open {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(console)
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
        })?;
    if !open(rustix::stdio::stdin()) {
        rustix::stdio::dup2_stdin(&file)?;
    }
    if !open(rustix::stdio::stdout()) {
        rustix::stdio::dup2_stdout(&file)?;
    }
    if !open(rustix::stdio::stderr()) {
        rustix::stdio::dup2_stderr(&file)?;
    }
    Ok(())
}

/// Sets close-on-exec on every open fd above 2, so a hand-off by `exec` passes on only
/// stdin, stdout and stderr.
pub fn cloexec_all_but_stdio() -> io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for raw in fds {
        // SAFETY: `raw` was listed in /proc/self/fd a moment ago and this process is single
        // threaded at hand-off, so it is open and nothing closes it while it is borrowed;
        // the borrow only lives for the fcntl call. The fd of the directory listing itself is
        // closed by now and fails with EBADF, which is ignored.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        match rustix::io::fcntl_getfd(fd) {
            Ok(flags) => rustix::io::fcntl_setfd(fd, flags | rustix::io::FdFlags::CLOEXEC)?,
            Err(rustix::io::Errno::BADF) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The signals PID 1 handles in supervise mode.
pub const HANDLED_SIGNALS: &[Signal] = &[
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGPWR,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGQUIT,
];

/// Signals delivered through a file descriptor instead of handlers: they are blocked while it
/// lives, and children started with std's `Command` get an empty mask again.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
    mask: SigSet,
}

impl Signals {
    /// Blocks `signals` for this thread and opens a signalfd for them.
    pub fn open(signals: &[Signal]) -> io::Result<Self> {
        let mut mask = SigSet::empty();
        for s in signals {
            mask.add(*s);
        }
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd, mask })
    }

    /// Waits up to `timeout` (forever when `None`) and returns the signals that arrived.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Vec<Signal>> {
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let mut pfd = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut pfd, ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let mut out = Vec::new();
        while let Some(info) = self.fd.read_signal()? {
            let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
            if let Ok(sig) = Signal::try_from(signo) {
                out.push(sig);
            }
        }
        Ok(out)
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&self.mask), None);
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Makes a `Command` start its program with an empty signal mask and every signal at its
/// default disposition, whatever PID 1 blocked or ignored (std itself does not reset the
/// mask of a spawned child, and its runtime ignores SIGPIPE).
pub fn reset_signals_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: it makes only sigprocmask(2) and
    // sigaction(2) system calls (through nix, which allocates nothing for these) and
    // touches no lock or heap memory.
    unsafe {
        cmd.pre_exec(reset_signals);
    }
}

/// Makes a `Command` start its program with these credentials: the supplementary groups
/// `groups` (none when empty), then the group ID `gid`, then the user ID `uid` — setgroups(2),
/// setgid(2), setuid(2) in the child, in that order (after the group calls, a user ID other
/// than 0 could not make them). A call that fails fails the spawn (or the exec) with its errno.
pub fn set_credentials_on_exec(
    cmd: &mut std::process::Command,
    uid: u32,
    gid: u32,
    groups: &[u32],
) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    let gid = nix::unistd::Gid::from_raw(gid);
    let uid = nix::unistd::Uid::from_raw(uid);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called: it makes only the setgroups(2), setgid(2)
    // and setuid(2) system calls, on values computed before the fork (nix passes the slice
    // as it is and allocates nothing), and touches no lock or heap allocation.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
}

/// Forks: `Ok(None)` in the child, `Ok(Some(pid))` in the parent. Only for a process that has
/// started no thread (PID 1 starts none), so that the child may go on running Rust code.
pub fn fork_single_threaded() -> io::Result<Option<u32>> {
    // SAFETY: fork(2) in a single-threaded process: no other thread can hold a lock (of the
    // allocator or of std) that the child would then wait on forever; the child gets a copy
    // of a consistent address space. Callers state that no thread was started.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => Ok(None),
        nix::unistd::ForkResult::Parent { child } => Ok(Some(child.as_raw().unsigned_abs())),
    }
}

/// This process's signals as a fresh program has them: an empty mask, every disposition the
/// default (a forked child of PID 1 that keeps running; a child between fork and exec: only
/// sigprocmask(2) and sigaction(2), no allocation).
pub fn reset_signals() -> io::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    let default = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigDfl,
        nix::sys::signal::SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: installing the default disposition runs no handler code of ours.
            let _ = unsafe { nix::sys::signal::sigaction(sig, &default) };
        }
    }
    Ok(())
}

/// Sends `sig` to one process.
pub fn kill(pid: u32, sig: Signal) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)?;
    Ok(())
}

/// Sends `sig` to every process of the process group `pgid`.
pub fn kill_group(pgid: u32, sig: Signal) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig)?;
    Ok(())
}

/// Unmounts `target` (no flags: a busy mount stays mounted and reports EBUSY).
pub fn unmount(target: &Path) -> io::Result<()> {
    rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty())?;
    Ok(())
}

/// Moves the mount at `source` (with everything mounted below it) to `target`.
pub fn move_mount(source: &Path, target: &Path) -> io::Result<()> {
    rustix::mount::mount_move(source, target)?;
    Ok(())
}

/// Changes the root directory of this process to `path`.
pub fn chroot(path: &Path) -> io::Result<()> {
    rustix::process::chroot(path)?;
    Ok(())
}

/// Bind-mounts `source` on `target` (paths, typically `/proc/self/fd/N`).
pub fn bind_mount(source: &Path, target: &Path) -> io::Result<()> {
    rustix::mount::mount_bind(source, target)?;
    Ok(())
}

/// Makes the bind mount at `target` read-only (`target` must name the new mount itself, not
/// an fd opened before it was mounted).
pub fn remount_bind_read_only(target: &Path) -> io::Result<()> {
    rustix::mount::mount_remount(
        target,
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )?;
    Ok(())
}

/// Connects an AF_VSOCK stream to `cid:port`, giving up after `connect_timeout`; the stream
/// then has send and receive deadlines of `io_timeout`.
pub fn vsock_connect(
    cid: u32,
    port: u32,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> io::Result<File> {
    use nix::sys::socket::{
        connect, getsockopt, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        VsockAddr,
    };
    use nix::sys::time::TimeVal;
    use std::os::fd::AsRawFd;
    // Non-blocking connect + poll: the kernel's own vsock connect timeout (2 s) and a
    // host that never completes the handshake must not stretch the caller's deadline.
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            let ts = rustix::time::Timespec {
                tv_sec: i64::try_from(connect_timeout.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(connect_timeout.subsec_nanos()),
            };
            let mut pfd = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::OUT,
            )];
            if rustix::event::poll(&mut pfd, Some(&ts))? == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            let err = getsockopt(&fd, sockopt::SocketError)?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(e.into()),
    }
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags - rustix::fs::OFlags::NONBLOCK)?;
    let tv = TimeVal::new(
        i64::try_from(io_timeout.as_secs()).unwrap_or(i64::MAX),
        i64::from(io_timeout.subsec_micros()),
    );
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    Ok(File::from(fd))
}

/// A file in `dir` with no name (O_TMPFILE): it vanishes when closed, so a received bundle
/// never outlives the fetch on any filesystem.
pub fn anonymous_file(dir: &Path) -> io::Result<File> {
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// Frees `len` bytes of `file` from `offset` (they read as zeros after), keeping its size: on a
/// tmpfs, the memory they took is given back at once.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::FallocateFlags;
    rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )?;
    Ok(())
}

/// Remounts the mount at `target` read-write (its other flags cleared).
pub fn remount_read_write(target: &Path) -> io::Result<()> {
    rustix::mount::mount_remount(target, MountFlags::empty(), "")?;
    Ok(())
}

/// Remounts the mount at `target` read-only (nosuid, nodev kept).
pub fn remount_read_only(target: &Path) -> io::Result<()> {
    rustix::mount::mount_remount(
        target,
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )?;
    Ok(())
}

/// Sets the host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    rustix::system::sethostname(name.as_bytes())?;
    Ok(())
}

/// Sends `sig` to every process but PID 1 itself (`kill(-1, sig)`).
pub fn kill_all(sig: Signal) -> io::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), sig)?;
    Ok(())
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// Reaps one ended child without blocking. `Ok(None)` when no child has ended yet;
/// `Err` with `ECHILD` when there are no children at all.
pub fn reap_one() -> io::Result<Option<(u32, Ended)>> {
    let opts = rustix::process::WaitOptions::NOHANG;
    match rustix::process::wait(opts)? {
        None => Ok(None),
        Some((pid, status)) => {
            let pid = u32::try_from(pid.as_raw_nonzero().get()).unwrap_or(0);
            if let Some(code) = status.exit_status() {
                Ok(Some((pid, Ended::Exited(code))))
            } else if let Some(sig) = status.terminating_signal() {
                Ok(Some((pid, Ended::Signaled(sig))))
            } else {
                // Stopped or continued children are not ended; report nothing.
                Ok(None)
            }
        }
    }
}

/// Whether an I/O error is `ECHILD` (no children left).
pub fn is_no_children(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::CHILD.raw_os_error())
}
