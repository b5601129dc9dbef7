//! The boot sequence of PID 1: early mounts, configuration, modules, hand-off — and the one
//! place that turns a failed step into a report and the configured failure policy.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bootstrap::{self, BootstrapError};
use crate::hostlink::HostLink;
use crate::modload::{ModLoadError, ModuleLoader};
use crate::mounts::{self, MountError};
use crate::supervise::{self, AppEnd};
use crate::{logger, sys};
use bootlace_contract::config::{self, ConfigError, FailurePolicy, HandoffMode, InitConfig};
use bootlace_contract::protocol::Kind;
use bootlace_contract::status::{self, ExitStatus};

/// The init's version, printed at start.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Default PATH given to the hand-off.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
    /// A configured module could not be loaded.
    #[error("config")]
    Modules(#[source] ModLoadError),
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
    /// Stage 1 could not switch to the real root.
    #[error("stage1")]
    Stage1(#[source] crate::stage1::Stage1Error),
    /// A writable location of the root could not be set up.
    #[error("root")]
    Writable(#[source] crate::apply::ApplyError),
}

impl BootError {
    /// The status reported when this error ends the boot.
    pub fn status(&self) -> ExitStatus {
        match self {
            BootError::Cmdline(_) | BootError::Config(_) => ExitStatus::Config,
            BootError::Bootstrap(e) if e.is_config() => ExitStatus::Config,
            BootError::Exec { source, .. } => supervise::spawn_error_status(source),
            BootError::Mount(_)
            | BootError::Modules(_)
            | BootError::Bootstrap(_)
            | BootError::Host(_)
            | BootError::Supervise(_)
            | BootError::Stage1(_)
            | BootError::Writable(_) => ExitStatus::BootStep,
        }
    }
}

pub use bootlace_contract::chain;

/// CLOCK_BOOTTIME stamps of the boot's milestones.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    stamps: Vec<(&'static str, Duration)>,
}

impl Timeline {
    /// Records a milestone now.
    pub fn mark(&mut self, what: &'static str) {
        self.stamps.push((what, sys::boottime()));
    }

    /// The stamp of the latest milestone (zero before the first).
    pub fn last(&self) -> Duration {
        self.stamps.last().map_or(Duration::ZERO, |(_, t)| *t)
    }

    /// `entry=0.912s config=0.915s … handoff=0.950s`.
    pub fn render(&self) -> String {
        self.stamps
            .iter()
            .map(|(w, t)| format!("{w}={}.{:03}s", t.as_secs(), t.subsec_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Prints the power-off line and powers off.
pub fn finish(status: ExitStatus, summary: &str) -> ! {
    logger::line(&status::line(status, summary));
    sys::power_off()
}

/// Installs the panic hook of PID 1: report, then power off. A panic must never unwind out of
/// PID 1 (the kernel would panic with "Attempted to kill init").
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        logger::line(&format!("error: bootlace-init panicked: {info}"));
        finish(ExitStatus::Internal, "bootlace-init panicked")
    }));
}

/// The state of one boot: what every step needs to report, fail and hand off.
struct Boot {
    config: InitConfig,
    timeline: Timeline,
    link: HostLink,
    loader: ModuleLoader,
    /// READY has been reported (after the manifest, before the cleanup).
    ready_sent: bool,
}

impl Boot {
    /// Reports a failed step (console, then host) and applies the failure policy. Returns
    /// only under `continue`.
    fn fail(&mut self, e: &BootError) {
        let text = chain(e);
        log::error!("{text}");
        self.link.report(
            Kind::Failed,
            &[
                ("STATUS", text.clone()),
                ("EXIT_STATUS", e.status().to_string()),
                ("POLICY", self.config.on_failure.as_str().to_owned()),
            ],
        );
        match self.config.on_failure {
            FailurePolicy::Continue => log::warn!("failure policy is continue: going on"),
            FailurePolicy::Poweroff => finish(e.status(), &text),
            FailurePolicy::Shell => {
                log::warn!("failure policy is shell: starting /bin/sh on the console");
                if let Ok(shell) = config::Command::try_from(vec!["/bin/sh".to_owned()]) {
                    let grace = Duration::from_millis(self.config.handoff.shutdown_grace_ms);
                    if let Err(e) = supervise::run(&shell, &handoff_env(&self.config), grace) {
                        log::error!("shell: {e}");
                    }
                }
                log::info!("timeline: {}", self.timeline.render());
                finish(e.status(), &text)
            }
        }
    }

    /// Records a milestone and reports the step that ended there to the host.
    fn step_done(&mut self, name: &'static str) {
        let before = self.timeline.last();
        self.timeline.mark(name);
        let took = self.timeline.last().saturating_sub(before);
        self.link.step(name, "finished", took, None);
    }
}

/// The environment of the hand-off: PATH, HOME, TERM (the kernel's, else `linux`), then the
/// configured variables, which may override those three.
pub fn handoff_env(config: &InitConfig) -> Vec<(String, String)> {
    let term = std::env::var("TERM").unwrap_or_else(|_| "linux".to_owned());
    let mut env: Vec<(String, String)> = vec![
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOME".to_owned(), "/".to_owned()),
        ("TERM".to_owned(), term),
    ];
    for (k, v) in &config.handoff.env {
        env.retain(|(name, _)| name != k.as_str());
        env.push((k.as_str().to_owned(), v.as_str().to_owned()));
    }
    env
}

/// Peak resident memory of this process (VmHWM), in KiB; 0 when unknown.
pub fn vm_hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The whole boot of PID 1. Never returns.
pub fn pid1() -> ! {
    let mut timeline = Timeline::default();
    timeline.mark("entry");
    logger::install();
    install_panic_hook();

    let early = mounts::early_mounts();
    if let Err(e) = sys::ensure_stdio(Path::new("/dev/console")) {
        log::warn!("cannot open /dev/console for stdio: {e}");
    }
    log::info!("bootlace-init {VERSION} started as PID 1");
    match &early {
        Ok(m) if m.is_empty() => log::info!("early mounts already in place"),
        Ok(m) => log::info!("mounted {}", m.join(" ")),
        Err(_) => {}
    }
    if let Err(e) = sys::disable_ctrl_alt_del() {
        log::warn!("cannot route ctrl-alt-del to PID 1: {e}");
    }

    let cmdline = std::fs::read_to_string("/proc/cmdline");
    let loaded = config::load(
        Path::new(config::CONFIG_PATH),
        cmdline.as_deref().unwrap_or(""),
        config::IfMissing::Defaults,
    );
    log::set_max_level(loaded.config.log.filter());
    timeline.mark("config");
    let mut boot = Boot {
        config: loaded.config,
        timeline,
        link: HostLink::none(),
        loader: ModuleLoader::new(),
        ready_sent: false,
    };
    // The first failure wins: a broken /proc explains a missing command line.
    let first_error = match (early, cmdline, loaded.error) {
        (Err(e), _, _) => Some(BootError::Mount(e)),
        (_, Err(e), _) => Some(BootError::Cmdline(e)),
        (_, _, Some(e)) => Some(BootError::Config(e)),
        _ => None,
    };
    let c = &boot.config;
    log::info!(
        "config: {} ({} mode, failure policy {}, log {:?})",
        if loaded.from_file {
            config::CONFIG_PATH
        } else {
            "built-in defaults"
        },
        match c.handoff.mode {
            HandoffMode::Exec => "exec",
            HandoffMode::Supervise => "supervise",
        },
        c.on_failure.as_str(),
        c.log,
    );

    // Reach the host first, so that every later failure (a bad config included) is reported.
    if boot.config.host.address.is_some() {
        match HostLink::connect(&boot.config.host, &mut boot.loader) {
            Ok(link) => boot.link = link,
            Err(e) => boot.fail(&BootError::Host(e)),
        }
        boot.step_done("host");
    }
    if let Some(e) = first_error {
        boot.fail(&e);
    }
    boot.link.step("config", "finished", Duration::ZERO, None);

    match boot
        .loader
        .load(boot.config.modules.iter().map(|m| m.as_str()))
    {
        Ok(loaded) if !loaded.is_empty() => {
            log::info!("loaded {} modules: {}", loaded.len(), loaded.join(" "))
        }
        Ok(_) => {}
        Err(e) => boot.fail(&BootError::Modules(e)),
    }
    boot.step_done("modules");

    if let Some(stage1) = boot.config.stage1.clone() {
        // Returns only when the switch failed.
        let e = BootError::Stage1(crate::stage1::switch_root(&stage1, &mut boot.loader));
        boot.fail(&e);
        // `continue` has nothing to continue with: an initramfs without its real root.
        finish(e.status(), &chain(&e))
    }

    if !boot.config.root.writable.is_empty() {
        let paths = boot.config.root.writable.clone();
        if let Err(e) = crate::apply::writable_locations(&paths, &mut boot.loader) {
            boot.fail(&BootError::Writable(e));
        }
        boot.step_done("writable");
    }

    if !boot.config.bootstrap.sources.is_empty() {
        match bootstrap::run(
            &boot.config,
            &mut boot.loader,
            &mut boot.timeline,
            &mut boot.link,
            &mut report_ready,
        ) {
            Ok((c, ready)) => {
                boot.config = c;
                boot.ready_sent = ready;
            }
            Err(e) => boot.fail(&BootError::Bootstrap(e)),
        }
    }

    handoff(boot)
}

/// `exec /sbin/init` or `supervise /bin/app --flag`.
fn handoff_what(config: &InitConfig) -> String {
    let cmd = &config.handoff.command;
    match config.handoff.mode {
        HandoffMode::Exec => format!("exec {cmd}"),
        HandoffMode::Supervise => format!("supervise {cmd}"),
    }
}

/// Stamps `ready` and reports READY with the timeline so far, the boot time and VmHWM.
fn report_ready(config: &InitConfig, timeline: &mut Timeline, link: &mut HostLink) {
    timeline.mark("ready");
    link.report(
        Kind::Ready,
        &[
            ("READY", "1".to_owned()),
            ("STATUS", format!("hand-off: {}", handoff_what(config))),
            ("TIMELINE", timeline.render()),
            ("BOOTTIME_NS", sys::boottime().as_nanos().to_string()),
            ("VMHWM_KB", vm_hwm_kb().to_string()),
        ],
    );
}

fn handoff(mut boot: Boot) -> ! {
    let env = handoff_env(&boot.config);
    let cmd = boot.config.handoff.command.clone();
    if !boot.ready_sent {
        report_ready(&boot.config, &mut boot.timeline, &mut boot.link);
    }
    boot.timeline.mark("handoff");
    log::info!(
        "timeline: {} (VmHWM {} KiB)",
        boot.timeline.render(),
        vm_hwm_kb()
    );
    let mode = boot.config.handoff.mode;
    let what = handoff_what(&boot.config);
    match mode {
        HandoffMode::Exec => {
            // Kernel arguments meant for init (after `--`, or unknown bare words) go on to
            // the real init, as if it had been started by the kernel itself.
            let kernel_args: Vec<String> = std::env::args().skip(1).collect();
            log::info!("hand-off: {what}");
            if let Err(e) = sys::cloexec_all_but_stdio() {
                log::warn!("cannot mark fds close-on-exec: {e}");
            }
            let source = supervise::command(&cmd, &kernel_args, &env).exec();
            let e = BootError::Exec {
                path: cmd.program().to_owned(),
                source,
            };
            boot.fail(&e);
            // `continue` has nothing left to continue to.
            finish(e.status(), &chain(&e))
        }
        HandoffMode::Supervise => {
            let grace = Duration::from_millis(boot.config.handoff.shutdown_grace_ms);
            match supervise::run(&cmd, &env, grace) {
                Ok(end) => {
                    if let AppEnd::SpawnFailed(e) = &end {
                        log::error!("hand-off: cannot execute {}: {e}", cmd.program().display());
                    }
                    sys::sync();
                    boot.link.report(
                        Kind::Exit,
                        &[
                            ("EXIT_STATUS", end.status().to_string()),
                            ("STATUS", end.summary(&cmd)),
                        ],
                    );
                    finish(end.status(), &end.summary(&cmd))
                }
                Err(e) => {
                    let e = BootError::Supervise(e);
                    boot.fail(&e);
                    finish(e.status(), &chain(&e))
                }
            }
        }
    }
}
