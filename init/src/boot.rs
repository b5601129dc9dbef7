//! The boot of PID 1, top to bottom — [`run`] reads as the boot does:
//!
//! 1. early mounts, a check that the kernel unpacked the whole initramfs, the kernel command
//!    line and the configuration (the first failure wins, and waits until the host is reachable
//!    to be reported);
//! 2. the host link, first, so that every later failure is reported to the host too;
//! 3. the configured kernel modules;
//! 4. stage 1 only: mount the real root and switch to it (returns only on failure);
//! 5. the writable locations of a read-only root;
//! 6. the bootstrap: find, mount, apply the manifest, READY, unmount and remove — the cleanup
//!    runs whenever something was mounted, whatever failed. When the manifest names a newer
//!    bootlace-init (`[init]`), it takes over PID 1 once the bootstrap is mounted, before the
//!    manifest is applied ([`crate::takeover`]), and [`resume`] goes on from there: the host
//!    session (same boot id, the next sequence number), the timeline, the manifest, READY,
//!    the cleanup and the hand-off; a newer init that fails its checks is not run, and this
//!    one goes on;
//! 7. the hand-off: exec the real init, or supervise the application and power off, or (a
//!    capture boot) power off with status 0 at once.
//!
//! Just before READY (after the manifest, or before the hand-off without a bootstrap), the
//! guest's identity is set: its machine ID, and systemd's environment when systemd is the real
//! init ([`crate::identity`]).
//!
//! Every failure goes through one place, [`Boot::fail`]: console first, then the host, then
//! the failure policy (power off, continue, or a shell then power off). Every effect goes
//! through [`Machine`], so these decisions are unit-tested with a recording fake.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use bootlace_contract::chain;
use bootlace_contract::config::{ConfigError, FailurePolicy, HandoffMode, InitConfig, Stage1};
use bootlace_contract::manifest::MANIFEST_NAME;
use bootlace_contract::protocol::Kind;
use bootlace_contract::status::{self, ExitStatus};
use bootlace_contract::takeover::{Handover, Stage};

use crate::apply::ApplyError;
use crate::bootstrap::{BootstrapError, Cleaned, Found, BOOTSTRAP_DIR};
use crate::hostlink::Resume;
use crate::identity::IdentityError;
use crate::machine::{Machine, RealMachine};
use crate::modload::ModLoadError;
use crate::mounts::MountError;
use crate::stage1::Stage1Error;
use crate::supervise::{handoff_env, AppEnd, RunAs};
use crate::takeover::TakeoverError;
use crate::timeline::Timeline;
use crate::unpacked::Truncated;
use crate::{logger, sys, VERSION};

/// A failed boot step. The message names the step; the source says why.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// An early mount failed.
    #[error("early mounts")]
    Mount(#[source] MountError),
    /// The kernel command line could not be read.
    #[error("config: cannot read /proc/cmdline")]
    Cmdline(#[source] io::Error),
    /// The configuration was refused.
    #[error("config")]
    Config(#[source] ConfigError),
    /// A configured module could not be loaded (the message starts with `modules`).
    #[error(transparent)]
    Modules(ModLoadError),
    /// The bootstrap failed.
    #[error("bootstrap")]
    Bootstrap(#[source] BootstrapError),
    /// The hand-off command could not be executed.
    #[error("hand-off: cannot execute {}", path.display())]
    Exec {
        /// The program.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The configured host could not be reached.
    #[error("host")]
    Host(#[source] bootlace_agent::client::ClientError),
    /// Supervising the application failed.
    #[error("supervise")]
    Supervise(#[source] io::Error),
    /// The kernel did not unpack the whole initramfs (the message says so).
    #[error(transparent)]
    Truncated(Truncated),
    /// Stage 1 could not switch to the real root.
    #[error("stage1")]
    Stage1(#[source] Stage1Error),
    /// A writable location of the root could not be set up.
    #[error("root")]
    Writable(#[source] ApplyError),
    /// The guest's identity could not be set.
    #[error("identity")]
    Identity(#[source] IdentityError),
    /// The state handed over by the init this one took over from could not be taken.
    #[error(transparent)]
    Takeover(TakeoverError),
}

impl BootError {
    /// The status reported when this error ends the boot.
    pub fn status(&self) -> ExitStatus {
        match self {
            BootError::Cmdline(_) | BootError::Config(_) => ExitStatus::Config,
            BootError::Bootstrap(e) if e.is_config() => ExitStatus::Config,
            BootError::Exec { source, .. } => crate::supervise::spawn_error_status(source),
            BootError::Mount(_)
            | BootError::Modules(_)
            | BootError::Bootstrap(_)
            | BootError::Host(_)
            | BootError::Supervise(_)
            | BootError::Stage1(_)
            | BootError::Truncated(_)
            | BootError::Writable(_)
            | BootError::Identity(_)
            | BootError::Takeover(_) => ExitStatus::BootStep,
        }
    }
}

/// PID 1: installs the console logger and the panic hook, then boots this machine. Never
/// returns.
pub fn pid1() -> ! {
    let entry = sys::boottime();
    logger::install();
    install_panic_hook();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match bootlace_contract::takeover::split_args(&args).0 {
        Some(state) => resume(&mut RealMachine::new(), entry, std::path::Path::new(&state)),
        None => run(&mut RealMachine::new(), entry),
    }
}

/// Installs the panic hook of PID 1: report, then power off. A panic must never unwind out of
/// PID 1 (the kernel would panic with "Attempted to kill init").
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        logger::line(&format!("error: bootlace-init panicked: {info}"));
        logger::line(&status::line(
            ExitStatus::Internal,
            "bootlace-init panicked",
        ));
        sys::power_off()
    }));
}

/// The whole boot on `m`, which PID 1 entered at `entry` (CLOCK_BOOTTIME). Never returns: it
/// ends in a hand-off or a deliberate power-off.
pub fn run<M: Machine>(m: &mut M, entry: Duration) -> ! {
    let mut boot = Boot::configure(m, entry, None);
    boot.connect_host(None);
    boot.load_modules();
    if let Some(stage1) = boot.config.stage1.clone() {
        boot.switch_root(&stage1);
    }
    boot.writable();
    boot.bootstrap();
    boot.handoff()
}

/// The boot of a newer init that took over PID 1 (entered at `entry`) with the state at
/// `state`: the config again, the host session resumed, then the manifest of the bootstrap
/// the previous init mounted, READY, the cleanup and the hand-off. Never returns.
pub fn resume<M: Machine>(m: &mut M, entry: Duration, state: &std::path::Path) -> ! {
    let handover = m.take_handover(state);
    let (handover, error) = match handover {
        Ok(h) => (Some(h), None),
        Err(e) => (None, Some(BootError::Takeover(e))),
    };
    let mut boot = Boot::configure(m, entry, handover.as_ref());
    if boot.first_error.is_none() {
        boot.first_error = error;
    }
    boot.connect_host(handover.as_ref());
    if boot.config.bootstrap.sources.is_empty() {
        log::warn!("init takeover: the config names no bootstrap source now; none is applied");
    } else {
        match boot.apply_and_clean() {
            Ok(Some(cfg)) => boot.config = cfg,
            Ok(None) => {}
            Err(e) => boot.fail(&BootError::Bootstrap(e)),
        }
    }
    boot.handoff()
}

/// The state of one boot: what every step needs to report, fail and hand off.
struct Boot<'m, M: Machine> {
    m: &'m mut M,
    config: InitConfig,
    timeline: Timeline,
    /// The first failure of the early steps, reported once the host is reachable.
    first_error: Option<BootError>,
    /// READY has been reported (after the manifest, before the cleanup).
    ready_sent: bool,
    /// The applied manifest's `instance_id`.
    instance_id: Option<String>,
}

impl<'m, M: Machine> Boot<'m, M> {
    /// Step 1: early mounts, the command line and the config. The first failure wins (a broken
    /// /proc explains a missing command line) and is kept for [`Boot::connect_host`]. A newer
    /// init that took over goes on with the `prior` timeline.
    fn configure(m: &'m mut M, entry: Duration, prior: Option<&Handover>) -> Self {
        let mut timeline = Timeline::default();
        match prior {
            Some(h) => {
                timeline = Timeline::from_stamps(&h.timeline);
                timeline.mark("init_takeover", entry);
            }
            None => timeline.mark("entry", entry),
        }
        let early = m.early_setup();
        match prior {
            Some(h) => log::info!(
                "bootlace-init {VERSION} took over PID 1 from bootlace-init {} ({} mounted)",
                h.from_version,
                h.bootstrap
            ),
            None => log::info!("bootlace-init {VERSION} started as PID 1"),
        }
        match &early {
            Ok(mounted) if mounted.is_empty() => log::info!("early mounts already in place"),
            Ok(mounted) => log::info!("mounted {}", mounted.join(" ")),
            Err(_) => {}
        }
        let cmdline = m.cmdline();
        let loaded = m.load_config(cmdline.as_deref().unwrap_or_default());
        log::set_max_level(loaded.config.log.filter());
        // A truncated root explains a config that is missing or cut short: it wins over it.
        let whole = m.unpacked_whole(loaded.config.root.unpacked_marker.as_ref());
        timeline.mark("config", m.now());
        let first_error = match (early, whole, cmdline, loaded.error) {
            (Err(e), _, _, _) => Some(BootError::Mount(e)),
            (_, Err(e), _, _) => Some(BootError::Truncated(e)),
            (_, _, Err(e), _) => Some(BootError::Cmdline(e)),
            (_, _, _, Some(e)) => Some(BootError::Config(e)),
            _ => None,
        };
        let c = &loaded.config;
        log::info!(
            "config: {} ({} mode, failure policy {}, log {:?})",
            if loaded.from_file {
                bootlace_contract::config::CONFIG_PATH
            } else {
                "built-in defaults"
            },
            c.handoff.mode.as_str(),
            c.on_failure.as_str(),
            c.log,
        );
        Boot {
            m,
            config: loaded.config,
            timeline,
            first_error,
            ready_sent: false,
            instance_id: None,
        }
    }

    /// Step 2: the host first, so that every later failure (a bad config included) is
    /// reported; then the failure of step 1, if any. After a takeover (`prior`) the session
    /// goes on: HELLO again with the same boot id and `TAKEOVER_FROM`, reports numbered after
    /// the previous init's, and the step `init_takeover` (its duration: from the hand-over to
    /// this init's entry).
    fn connect_host(&mut self, prior: Option<&Handover>) {
        if self.config.host.address.is_some() {
            let resume = prior.map(|h| Resume {
                after_seq: h.host_seq.unwrap_or(0),
                from_version: h.from_version.clone(),
            });
            if let Err(e) = self.m.connect_host(
                &self.config.host,
                self.config.image.as_ref(),
                resume.as_ref(),
            ) {
                self.fail(&BootError::Host(e));
            }
            if prior.is_none() {
                self.step_done("host");
            }
        }
        if let Some(e) = self.first_error.take() {
            self.fail(&e);
        }
        match prior {
            None => self.report_step("config", true, Duration::ZERO),
            Some(h) => {
                let handed = h.timeline.last().map_or(0, |s| s.ns);
                let took = self
                    .timeline
                    .at("init_takeover")
                    .unwrap_or_default()
                    .saturating_sub(Duration::from_nanos(handed));
                let from = ("FROM_VERSION", h.from_version.clone());
                self.report_step_with("init_takeover", true, took, &[from]);
            }
        }
    }

    /// Step 3: the modules the config names, with their dependencies.
    fn load_modules(&mut self) {
        match self.m.load_modules(&self.config.modules) {
            Ok(loaded) if !loaded.is_empty() => {
                log::info!("loaded {} modules: {}", loaded.len(), loaded.join(" "))
            }
            Ok(_) => {}
            Err(e) => self.fail(&BootError::Modules(e)),
        }
        self.step_done("modules");
    }

    /// Step 4 (a stage-1 initramfs): switch to the real root; returns only on failure, and
    /// `continue` has nothing to continue with (an initramfs without its real root).
    fn switch_root(&mut self, stage1: &Stage1) -> ! {
        let e = BootError::Stage1(self.m.switch_root(stage1));
        self.fail(&e);
        self.m.power_off(e.status(), &chain(&e))
    }

    /// Step 5: an overlay (or a tmpfs copy) over each writable location of a read-only root.
    fn writable(&mut self) {
        if self.config.root.writable.is_empty() {
            return;
        }
        if let Err(e) = self.m.writable(&self.config.root) {
            self.fail(&BootError::Writable(e));
        }
        self.step_done("writable");
    }

    /// Step 6: the bootstrap, when sources are configured. On success the hand-off takes the
    /// manifest's environment and hand-off overrides.
    fn bootstrap(&mut self) {
        if self.config.bootstrap.sources.is_empty() {
            return;
        }
        match self.run_bootstrap() {
            Ok(Some(cfg)) => self.config = cfg,
            Ok(None) => {}
            Err(e) => self.fail(&BootError::Bootstrap(e)),
        }
    }

    /// Find, mount, (a newer init takes over,) apply, READY, clean up. Once anything may be
    /// mounted, the cleanup runs on every path; a cleanup failure after another failure is
    /// logged, the first one returned.
    fn run_bootstrap(&mut self) -> Result<Option<InitConfig>, BootstrapError> {
        let Some(found) = self.m.find_bootstrap(&self.config.bootstrap)? else {
            return Ok(None);
        };
        self.step_done("bootstrap_found");
        log::info!("bootstrap: found {found}");
        if let Err(e) = self.m.mount_bootstrap(&found, &self.config) {
            self.step("bootstrap_mounted", false);
            if let Err(c) = self.m.cleanup_bootstrap() {
                log::error!("{}", chain(&c));
            }
            return Err(e);
        }
        self.step_done("bootstrap_mounted");
        log::info!("bootstrap: mounted {found} read-only on {BOOTSTRAP_DIR}");
        self.take_over(&found);
        self.apply_and_clean()
    }

    /// When the manifest names a newer bootlace-init: copy it out, check it and hand PID 1
    /// over to it. Returns only when there is none, or it failed its checks or its exec (the
    /// step `init_takeover` is reported failed, and this init goes on).
    fn take_over(&mut self, found: &Found) {
        let started = self.m.now();
        let next = match self.m.prepare_init() {
            Ok(None) => return,
            Ok(Some(next)) => next,
            Err(e) => return self.takeover_failed(&e, started),
        };
        log::info!(
            "init: handing PID 1 over to bootlace-init {} ({}, {} bytes, self-check passed)",
            next.version,
            next.sha256,
            next.bytes
        );
        let took = self.m.now().saturating_sub(started);
        self.timeline.mark("init_handover", self.m.now());
        let to = ("NEXT_VERSION", next.version.clone());
        self.report_step_with("init_handover", true, took, &[to]);
        let state = Handover {
            state_version: bootlace_contract::takeover::STATE_VERSION,
            from_version: VERSION.to_owned(),
            stage: Stage::BootstrapMounted,
            timeline: self.timeline.to_stamps(),
            host_seq: self.m.host_seq(),
            bootstrap: found.to_string(),
        };
        let e = self.m.exec_init(&next, &state);
        self.takeover_failed(&e, started);
    }

    fn takeover_failed(&mut self, e: &TakeoverError, started: Duration) {
        let text = chain(e);
        log::warn!("{text}; bootlace-init {VERSION} goes on");
        let took = self.m.now().saturating_sub(started);
        self.report_step_with("init_takeover", false, took, &[("STATUS", text)]);
    }

    /// Apply the mounted bootstrap's manifest, READY, clean up.
    fn apply_and_clean(&mut self) -> Result<Option<InitConfig>, BootstrapError> {
        let applied = self.m.apply_bootstrap(&self.config);
        self.step("manifest_done", applied.is_ok());
        if let Ok((cfg, applied)) = &applied {
            self.instance_id = applied.instance_id.clone();
            // The host learns of READY without waiting for the unmount.
            self.report_ready(cfg);
        }
        let cleaned = self.m.cleanup_bootstrap();
        self.step("cleanup_done", cleaned.is_ok());
        match (applied, cleaned) {
            (Ok((cfg, applied)), Ok(cleaned)) => {
                log::info!(
                    "bootstrap: applied {MANIFEST_NAME} ({}); {BOOTSTRAP_DIR} unmounted{}",
                    applied.summary(),
                    match cleaned {
                        Cleaned::Removed => " and removed",
                        Cleaned::MountPointStays =>
                            " (its empty mount point stays on the read-only root)",
                    }
                );
                Ok(Some(cfg))
            }
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
            (Err(e), Err(c)) => {
                log::error!("{}", chain(&c));
                Err(e)
            }
        }
    }

    /// Step 7: READY (unless the bootstrap sent it), the timeline, then exec or supervise.
    fn handoff(mut self) -> ! {
        if !self.ready_sent {
            let config = self.config.clone();
            self.report_ready(&config);
        }
        self.timeline.mark("handoff", self.m.now());
        log::info!(
            "timeline: {} (VmHWM {} KiB)",
            self.timeline.render(),
            self.m.vm_hwm_kb()
        );
        let env = handoff_env(&self.config);
        let cmd = self.config.handoff.command.clone();
        let run_as = RunAs::of(&self.config.handoff);
        log::info!("hand-off: {}", handoff_what(&self.config));
        let e = match self.config.handoff.mode {
            HandoffMode::Poweroff => self.configured_poweroff(),
            HandoffMode::Exec => BootError::Exec {
                path: cmd.program().to_owned(),
                source: self.m.exec(&cmd, &env, &run_as),
            },
            HandoffMode::Supervise => {
                let grace = Duration::from_millis(self.config.handoff.shutdown_grace_ms);
                match self.m.supervise(&cmd, &env, &run_as, grace) {
                    Ok(end) => self.app_ended(&end, &cmd),
                    Err(e) => BootError::Supervise(e),
                }
            }
        };
        // `continue` has nothing left to continue to.
        self.fail(&e);
        self.m.power_off(e.status(), &chain(&e))
    }

    /// The `poweroff` hand-off (a capture boot): nothing is run; sync, EXIT 0 to the host,
    /// power off with status 0.
    fn configured_poweroff(&mut self) -> ! {
        let summary = "configuration applied; hand-off poweroff";
        self.m.sync();
        self.m.report(
            Kind::Exit,
            &[
                ("EXIT_STATUS", "0".to_owned()),
                ("STATUS", summary.to_owned()),
            ],
        );
        self.m.power_off(ExitStatus::Exited(0), summary)
    }

    /// The supervised application has ended (or never started): EXIT to the host, power off.
    fn app_ended(&mut self, end: &AppEnd, cmd: &bootlace_contract::config::Command) -> ! {
        if let AppEnd::SpawnFailed(e) = end {
            log::error!("hand-off: cannot execute {}: {e}", cmd.program().display());
        }
        self.m.sync();
        self.m.report(
            Kind::Exit,
            &[
                ("EXIT_STATUS", end.status().to_string()),
                ("STATUS", end.summary(cmd)),
            ],
        );
        self.m.power_off(end.status(), &end.summary(cmd))
    }

    /// Reports a failed step (console, then host) and applies the failure policy. Returns
    /// only under `continue`.
    fn fail(&mut self, e: &BootError) {
        let text = chain(e);
        log::error!("{text}");
        let mut fields = vec![
            ("STATUS", text.clone()),
            ("EXIT_STATUS", e.status().to_string()),
            ("POLICY", self.config.on_failure.as_str().to_owned()),
        ];
        fields.extend(self.memory_fields());
        self.m.report(Kind::Failed, &fields);
        match self.config.on_failure {
            FailurePolicy::Continue => log::warn!("failure policy is continue: going on"),
            FailurePolicy::Poweroff => self.m.power_off(e.status(), &text),
            FailurePolicy::Shell => {
                log::warn!("failure policy is shell: starting /bin/sh on the console");
                let grace = Duration::from_millis(self.config.handoff.shutdown_grace_ms);
                self.m.shell(&handoff_env(&self.config), grace);
                log::info!("timeline: {}", self.timeline.render());
                self.m.power_off(e.status(), &text)
            }
        }
    }

    /// Stamps `ready` and reports READY with the timeline so far, the boot time and VmHWM;
    /// `config` is the one the hand-off will use.
    fn report_ready(&mut self, config: &InitConfig) {
        // The guest is itself before it says it is ready: nothing after READY holds the hand-off.
        // A poweroff hand-off (a capture boot) is no guest of its own: it gets no identity,
        // so no machine ID is written into what will be captured.
        if config.handoff.mode == HandoffMode::Poweroff {
            log::info!("identity: not set (hand-off poweroff)");
        } else if let Err(e) = self.m.identity(config, self.instance_id.as_deref()) {
            self.fail(&BootError::Identity(e));
        }
        let now = self.m.now();
        self.timeline.mark("ready", now);
        let mut fields = vec![
            ("READY", "1".to_owned()),
            ("STATUS", format!("hand-off: {}", handoff_what(config))),
            ("TIMELINE", self.timeline.render()),
            ("BOOTTIME_NS", now.as_nanos().to_string()),
            ("VMHWM_KB", self.m.vm_hwm_kb().to_string()),
        ];
        fields.extend(self.memory_fields());
        self.m.report(Kind::Ready, &fields);
        self.ready_sent = true;
    }

    /// `MEM_TOTAL_KB` and `MEM_PEAK_KB` (the guest's memory and its peak use so far).
    fn memory_fields(&self) -> Vec<(&'static str, String)> {
        match self.m.memory_kb() {
            Some((total, peak)) => vec![
                ("MEM_TOTAL_KB", total.to_string()),
                ("MEM_PEAK_KB", peak.to_string()),
            ],
            None => Vec::new(),
        }
    }

    /// Records a milestone that ended a step that worked, and reports it.
    fn step_done(&mut self, name: &'static str) {
        self.step(name, true);
    }

    /// Records a milestone and reports the step that ended there (and how long it took).
    fn step(&mut self, name: &'static str, ok: bool) {
        let before = self.timeline.last();
        self.timeline.mark(name, self.m.now());
        let took = self.timeline.last().saturating_sub(before);
        self.report_step(name, ok, took);
    }

    fn report_step(&mut self, name: &str, ok: bool, took: Duration) {
        self.report_step_with(name, ok, took, &[]);
    }

    fn report_step_with(&mut self, name: &str, ok: bool, took: Duration, more: &[(&str, String)]) {
        let mut fields = vec![
            ("STEP", name.to_owned()),
            ("STATE", if ok { "finished" } else { "failed" }.to_owned()),
            ("DURATION_MS", took.as_millis().to_string()),
        ];
        fields.extend(more.iter().cloned());
        self.m.report(Kind::Step, &fields);
    }
}

/// `exec /sbin/init` or `supervise /bin/app --flag` (` in /srv as 1000:1000` when the
/// hand-off has a working directory or credentials of its own).
fn handoff_what(config: &InitConfig) -> String {
    format!(
        "{} {}{}",
        config.handoff.mode.as_str(),
        config.handoff.command,
        RunAs::of(&config.handoff).describe()
    )
}
