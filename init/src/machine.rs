//! What the boot does to the machine, behind one trait: [`Machine`]. The boot's decisions —
//! the order of the steps, the failure policy, what is reported to the host and what is
//! cleaned up — live in [`crate::boot`] and reach the machine only through this trait, so a
//! recording fake can test them without a VM. [`RealMachine`] is PID 1's: each method is one
//! step of the toolbox below it.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootlace_agent::client::ClientError;
use bootlace_contract::config::{
    self, Bootstrap, Command, Host, IfMissing, ImageRef, InitConfig, Loaded, ModuleName, RootFs,
    Stage1, TargetPath,
};
use bootlace_contract::manifest::ManifestError;
use bootlace_contract::protocol::Kind;
use bootlace_contract::status::{self, ExitStatus};
use bootlace_contract::takeover::Handover;

use crate::apply::{Applied, ApplyError};
use crate::bootstrap::{self, BootstrapError, Cleaned, Found, BOOTSTRAP_DIR};
use crate::hostlink::{HostLink, Resume};
use crate::identity::IdentityError;
use crate::memory::{self, MemInfo};
use crate::modload::{ModLoadError, ModuleLoader};
use crate::mounts::{self, MountError};
use crate::stage1::{self, Stage1Error};
use crate::supervise::{self, AppEnd, RunAs};
use crate::sys::root::Root;
use crate::takeover::{self, Prepared, TakeoverError};
use crate::unpacked::{self, Truncated};
use crate::{logger, sys};

/// The effects of a boot. Methods that end the boot (`power_off`, a successful `exec` or
/// `switch_root`) never return on a real machine.
pub trait Machine {
    /// CLOCK_BOOTTIME now (the timeline's clock).
    fn now(&self) -> Duration;
    /// The early mounts (proc, sys, dev, run), stdio on the console, ctrl-alt-del routed to
    /// PID 1. Returns the mounts made.
    fn early_setup(&mut self) -> Result<Vec<&'static str>, MountError>;
    /// Whether the kernel unpacked the initramfs whole (`marker`: the config's
    /// `[root] unpacked_marker`); always fine when the root is not an initramfs.
    fn unpacked_whole(&mut self, marker: Option<&TargetPath>) -> Result<(), Truncated>;
    /// The kernel command line, as its raw bytes.
    fn cmdline(&mut self) -> io::Result<Vec<u8>>;
    /// The baked config with the command line applied and the whole validated.
    fn load_config(&mut self, cmdline: &[u8]) -> Loaded;
    /// Connects to the host and says HELLO; `resume`: going on with the session of the init
    /// this one took over from.
    fn connect_host(
        &mut self,
        host: &Host,
        image: Option<&ImageRef>,
        resume: Option<&Resume>,
    ) -> Result<(), ClientError>;
    /// Whether a host is connected.
    fn host_connected(&self) -> bool;
    /// The host session's last sequence number, when a host is connected.
    fn host_seq(&self) -> Option<u64>;
    /// The newer bootlace-init the mounted bundle's manifest names (`[init]`), copied out of
    /// the bundle with its digest checked and its self-check passed; `None` when it names none,
    /// or names the program running.
    fn prepare_init(&mut self) -> Result<Option<Prepared>, TakeoverError>;
    /// Hands PID 1 over to `next` with `state`; returns only the error (nothing of the
    /// takeover is left then, and the host link still stands).
    fn exec_init(&mut self, next: &Prepared, state: &Handover) -> TakeoverError;
    /// The newer init's side: the state handed over at `path` (removed once read).
    fn take_handover(&mut self, path: &Path) -> Result<Handover, TakeoverError>;
    /// Sends a report to the host: nothing without one; a host lost on the way is logged and
    /// dropped (the boot is not held hostage to it).
    fn report(&mut self, kind: Kind, fields: &[(&str, String)]);
    /// Loads kernel modules with their dependencies; returns those loaded.
    fn load_modules(&mut self, names: &[ModuleName]) -> Result<Vec<String>, ModLoadError>;
    /// Mounts the real root, switches to it and executes its init; returns only on failure.
    fn switch_root(&mut self, stage1: &Stage1) -> Stage1Error;
    /// Makes the writable locations of a read-only root writable: an overlay with a tmpfs upper
    /// layer over each, else a tmpfs holding a copy.
    fn writable(&mut self, root: &RootFs) -> Result<(), ApplyError>;
    /// Looks for the bootstrap in the configured sources.
    fn find_bootstrap(&mut self, cfg: &Bootstrap) -> Result<Option<Found>, BootstrapError>;
    /// Mounts what was found on `/.bootstrap` (a vsock bundle: fetched, checked, unpacked).
    fn mount_bootstrap(&mut self, found: &Found, config: &InitConfig)
        -> Result<(), BootstrapError>;
    /// Reads and applies the manifest; returns the config for the hand-off.
    fn apply_bootstrap(
        &mut self,
        config: &InitConfig,
    ) -> Result<(InitConfig, Applied), BootstrapError>;
    /// Unmounts and removes `/.bootstrap`.
    fn cleanup_bootstrap(&mut self) -> Result<Cleaned, BootstrapError>;
    /// Sets the guest's machine ID and, for systemd, its environment ([`crate::identity`]).
    fn identity(
        &mut self,
        config: &InitConfig,
        instance_id: Option<&str>,
    ) -> Result<(), IdentityError>;
    /// Replaces PID 1 with `cmd` (the kernel's arguments for init follow), in the working
    /// directory and with the credentials of `run_as`; returns only the error when it could
    /// not.
    fn exec(&mut self, cmd: &Command, env: &[(String, String)], run_as: &RunAs) -> io::Error;
    /// Runs `cmd` as a child (in the working directory and with the credentials of `run_as`)
    /// and stays PID 1 until it and every other process have ended.
    fn supervise(
        &mut self,
        cmd: &Command,
        env: &[(String, String)],
        run_as: &RunAs,
        grace: Duration,
    ) -> io::Result<AppEnd>;
    /// Runs `/bin/sh` on the console (the `shell` failure policy) until it exits.
    fn shell(&mut self, env: &[(String, String)], grace: Duration);
    /// Flushes every filesystem.
    fn sync(&mut self);
    /// Peak resident memory of PID 1 in KiB (VmHWM); 0 when unknown.
    fn vm_hwm_kb(&self) -> u64;
    /// The guest's memory and its peak use so far (sampled at the boot's heavy steps), in KiB.
    fn memory_kb(&self) -> Option<(u64, u64)>;
    /// Prints the power-off line and powers off.
    fn power_off(&mut self, status: ExitStatus, summary: &str) -> !;
}

/// PID 1's machine: the real system calls, through the toolbox modules.
#[derive(Debug, Default)]
pub struct RealMachine {
    loader: ModuleLoader,
    link: HostLink,
}

impl RealMachine {
    /// For an exec of systemd with a host connected: the relay of systemd's readiness
    /// ([`crate::relay`]) and `NOTIFY_SOCKET` in `env`; its pid.
    fn start_relay(&mut self, cmd: &Command, env: &mut Vec<(String, String)>) -> Option<u32> {
        let client = self.link.client()?;
        if !crate::identity::runs_systemd(cmd) {
            return None;
        }
        match crate::relay::start(client) {
            Ok(pid) => {
                log::info!(
                    "hand-off: systemd's readiness goes to the host through {} (relay pid {pid})",
                    crate::relay::NOTIFY_SOCKET
                );
                env.push((
                    "NOTIFY_SOCKET".to_owned(),
                    crate::relay::NOTIFY_SOCKET.to_owned(),
                ));
                Some(pid)
            }
            Err(e) => {
                log::warn!("hand-off: no relay for systemd's readiness: {e}");
                None
            }
        }
    }
}

impl RealMachine {
    /// The machine this process runs on.
    pub fn new() -> Self {
        RealMachine::default()
    }
}

impl Machine for RealMachine {
    fn now(&self) -> Duration {
        sys::boottime()
    }

    fn early_setup(&mut self) -> Result<Vec<&'static str>, MountError> {
        let early = mounts::early_mounts();
        // The first reading of the guest's memory (the peak reported with READY starts here).
        let _ = MemInfo::read();
        if let Err(e) = sys::ensure_stdio(Path::new("/dev/console")) {
            log::warn!("cannot open /dev/console for stdio: {e}");
        }
        if let Err(e) = sys::disable_ctrl_alt_del() {
            log::warn!("cannot route ctrl-alt-del to PID 1: {e}");
        }
        early
    }

    fn unpacked_whole(&mut self, marker: Option<&TargetPath>) -> Result<(), Truncated> {
        unpacked::check(Path::new("/dev/kmsg"), marker.map(TargetPath::as_str))
    }

    fn cmdline(&mut self) -> io::Result<Vec<u8>> {
        std::fs::read("/proc/cmdline")
    }

    fn load_config(&mut self, cmdline: &[u8]) -> Loaded {
        config::load(Path::new(config::CONFIG_PATH), cmdline, IfMissing::Defaults)
    }

    fn connect_host(
        &mut self,
        host: &Host,
        image: Option<&ImageRef>,
        resume: Option<&Resume>,
    ) -> Result<(), ClientError> {
        self.link = HostLink::connect(host, &mut self.loader, crate::VERSION, image, resume)?;
        Ok(())
    }

    fn host_connected(&self) -> bool {
        self.link.is_connected()
    }

    fn host_seq(&self) -> Option<u64> {
        self.link.seq()
    }

    fn prepare_init(&mut self) -> Result<Option<Prepared>, TakeoverError> {
        let bundle = Root::open(Path::new(BOOTSTRAP_DIR)).map_err(|source| {
            TakeoverError::Manifest(ManifestError::Read {
                path: PathBuf::from(BOOTSTRAP_DIR),
                source,
            })
        })?;
        let Some(next) = takeover::wanted(&bundle, Path::new(BOOTSTRAP_DIR))? else {
            return Ok(None);
        };
        takeover::prepare(
            &bundle,
            &next,
            Path::new(bootlace_contract::takeover::NEXT_INIT_PATH),
            (Path::new("/proc/self/exe"), crate::VERSION),
        )
    }

    fn exec_init(&mut self, next: &Prepared, state: &Handover) -> TakeoverError {
        takeover::exec(
            next,
            state,
            Path::new(bootlace_contract::takeover::STATE_PATH),
        )
    }

    fn take_handover(&mut self, path: &Path) -> Result<Handover, TakeoverError> {
        takeover::take_state(path, Path::new(bootlace_contract::takeover::NEXT_INIT_PATH))
    }

    fn report(&mut self, kind: Kind, fields: &[(&str, String)]) {
        self.link.report(kind, fields);
    }

    fn load_modules(&mut self, names: &[ModuleName]) -> Result<Vec<String>, ModLoadError> {
        self.loader.load(names.iter().map(ModuleName::as_str))
    }

    fn switch_root(&mut self, stage1: &Stage1) -> Stage1Error {
        stage1::switch_root(stage1, &mut self.loader)
    }

    fn writable(&mut self, root: &RootFs) -> Result<(), ApplyError> {
        crate::writable::writable_locations(root, &mut self.loader)
    }

    fn find_bootstrap(&mut self, cfg: &Bootstrap) -> Result<Option<Found>, BootstrapError> {
        let connected = self.link.is_connected();
        bootstrap::find(cfg, &mut self.loader, connected)
    }

    fn mount_bootstrap(
        &mut self,
        found: &Found,
        config: &InitConfig,
    ) -> Result<(), BootstrapError> {
        bootstrap::mount(found, config, &mut self.loader, self.link.client())
    }

    fn apply_bootstrap(
        &mut self,
        config: &InitConfig,
    ) -> Result<(InitConfig, Applied), BootstrapError> {
        bootstrap::read_and_apply(config, &mut self.loader)
    }

    fn cleanup_bootstrap(&mut self) -> Result<Cleaned, BootstrapError> {
        bootstrap::cleanup()
    }

    fn identity(
        &mut self,
        config: &InitConfig,
        instance_id: Option<&str>,
    ) -> Result<(), IdentityError> {
        crate::identity::set(config, instance_id)
    }

    fn exec(&mut self, cmd: &Command, env: &[(String, String)], run_as: &RunAs) -> io::Error {
        if let Err(e) = run_as.check() {
            return e;
        }
        let mut env = env.to_vec();
        let relay = self.start_relay(cmd, &mut env);
        if let Err(e) = sys::cloexec_all_but_stdio() {
            log::warn!("cannot mark fds close-on-exec: {e}");
        }
        let kernel_args: Vec<OsString> = supervise::kernel_args();
        let e = supervise::command(cmd, &kernel_args, &env, run_as).exec();
        // Still here: systemd never ran, and its relay has nothing to wait for.
        if let Some(pid) = relay {
            if let Err(k) = sys::kill(pid, nix::sys::signal::Signal::SIGTERM) {
                log::warn!("hand-off: stop the relay (pid {pid}): {k}");
            }
        }
        e
    }

    fn supervise(
        &mut self,
        cmd: &Command,
        env: &[(String, String)],
        run_as: &RunAs,
        grace: Duration,
    ) -> io::Result<AppEnd> {
        supervise::run(cmd, env, run_as, grace)
    }

    fn shell(&mut self, env: &[(String, String)], grace: Duration) {
        if let Ok(shell) = Command::try_from(vec!["/bin/sh".to_owned()]) {
            if let Err(e) = supervise::run(&shell, env, &RunAs::default(), grace) {
                log::error!("shell: {e}");
            }
        }
    }

    fn sync(&mut self) {
        sys::sync();
    }

    fn vm_hwm_kb(&self) -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    fn memory_kb(&self) -> Option<(u64, u64)> {
        // A reading now, too: the peak may be the present.
        let _ = MemInfo::read();
        memory::peak_used_kb()
    }

    fn power_off(&mut self, status: ExitStatus, summary: &str) -> ! {
        logger::line(&status::line(status, summary));
        sys::power_off()
    }
}
