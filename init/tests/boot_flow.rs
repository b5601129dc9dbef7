//! The boot's decisions, without a VM: `boot::run` on a recording fake [`Machine`]. Each case
//! scripts what the machine does (a step fails, the app exits 3, …) and checks what the boot
//! decided: the order of the steps, what went to the host (and when READY went), what was
//! cleaned up, the failure policy, and the status it powered off with.
//!
//! A real machine never comes back from a power-off, an exec or a switch of root; the fake
//! records the call and unwinds (`resume_unwind`, no panic message), and the test catches it.

use std::io;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootlace_agent::client::ClientError;
use bootlace_contract::config::{
    Bootstrap, Command, ConfigError, FailurePolicy, HandoffMode, Host, InitConfig, Loaded,
    ModuleName, RootFs, Source, Stage1, TargetPath, UnixId,
};
use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::kmod::KmodError;
use bootlace_contract::manifest::ManifestError;
use bootlace_contract::protocol::Kind;
use bootlace_contract::status::ExitStatus;
use bootlace_contract::takeover::{Handover, Stage, Stamp, StateError};
use bootlace_init::apply::{Applied, ApplyError};
use bootlace_init::boot;
use bootlace_init::bootstrap::{BootstrapError, Cleaned, Found};
use bootlace_init::hostlink::Resume;
use bootlace_init::identity::IdentityError;
use bootlace_init::machine::Machine;
use bootlace_init::modload::ModLoadError;
use bootlace_init::mounts::MountError;
use bootlace_init::stage1::Stage1Error;
use bootlace_init::supervise::{AppEnd, RunAs};
use bootlace_init::sys::Ended;
use bootlace_init::takeover::{Prepared, TakeoverError};
use bootlace_init::unpacked::Truncated;

/// A step the fake can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Early,
    Truncated,
    Cmdline,
    Host,
    Modules,
    Writable,
    Find,
    Mount,
    Apply,
    ApplyManifest,
    Cleanup,
    Exec,
    Switch,
    /// The newer init fails its checks.
    Prepare,
    /// Its exec fails.
    ExecInit,
    /// The state handed over cannot be read.
    Handover,
}

/// How the fake's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    PowerOff(u8, String),
    Exec(String),
    Switched,
    /// PID 1 handed over to a newer init, with this state.
    TookOver(Box<Handover>),
}

#[derive(Debug)]
struct Fake {
    config: InitConfig,
    config_error: Option<ConfigError>,
    failing: Vec<Step>,
    /// What `find_bootstrap` finds (`None`: nothing, an optional bootstrap).
    found: Option<Found>,
    /// How the supervised app ends.
    app: Option<AppEnd>,
    /// The hand-off config a manifest gives.
    manifest_env: Option<(String, String)>,
    connected: bool,
    /// Reports sent (the host session's sequence number).
    seq: u64,
    /// What `connect_host` was asked to resume.
    resumed: Option<Resume>,
    /// The newer init the manifest names.
    next_init: Option<Prepared>,
    /// The state a resumed boot takes.
    handover: Option<Handover>,
    clock_ms: u64,
    /// What happened, in order.
    log: Vec<String>,
    end: Option<End>,
}

impl Fake {
    fn new(config: InitConfig) -> Fake {
        Fake {
            config,
            config_error: None,
            failing: Vec::new(),
            found: Some(Found::NineP {
                tag: "bootlace".into(),
            }),
            app: None,
            manifest_env: None,
            connected: false,
            seq: 0,
            resumed: None,
            next_init: None,
            handover: None,
            clock_ms: 1000,
            log: Vec::new(),
            end: None,
        }
    }

    fn failing(mut self, steps: &[Step]) -> Fake {
        self.failing.extend(steps);
        self
    }

    fn fails(&self, s: Step) -> bool {
        self.failing.contains(&s)
    }

    fn io(what: &str) -> io::Error {
        io::Error::other(format!("{what} failed (fake)"))
    }

    /// Runs the boot to its end and returns the fake.
    fn boot(self) -> Fake {
        self.run_with(|f| boot::run(f, Duration::ZERO))
    }

    /// Runs the boot of a newer init that took over (entered at 5 s) to its end.
    fn resume(self) -> Fake {
        self.run_with(|f| boot::resume(f, Duration::from_secs(5), Path::new("/run/state")))
    }

    fn run_with(mut self, boot: impl FnOnce(&mut Fake) -> std::convert::Infallible) -> Fake {
        let r = catch_unwind(AssertUnwindSafe(|| boot(&mut self)));
        match r {
            Ok(never) => match never {},
            Err(payload) => {
                if payload.downcast_ref::<End>().is_none() {
                    resume_unwind(payload)
                }
            }
        }
        self
    }

    fn ended(&mut self, end: End) -> ! {
        self.end = Some(end.clone());
        resume_unwind(Box::new(end))
    }

    /// The log entries that start with `prefix`.
    fn entries(&self, prefix: &str) -> Vec<&str> {
        self.log
            .iter()
            .filter(|l| l.starts_with(prefix))
            .map(String::as_str)
            .collect()
    }

    /// The position of the first entry starting with `prefix`.
    fn at(&self, prefix: &str) -> usize {
        self.log
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:#?}", self.log))
    }

    fn has(&self, prefix: &str) -> bool {
        self.log.iter().any(|l| l.starts_with(prefix))
    }

    fn powered_off(&self) -> (u8, &str) {
        match &self.end {
            Some(End::PowerOff(s, text)) => (*s, text),
            other => panic!("not powered off: {other:?}\n{:#?}", self.log),
        }
    }
}

impl Machine for Fake {
    fn now(&self) -> Duration {
        Duration::from_millis(self.clock_ms)
    }

    fn early_setup(&mut self) -> Result<Vec<&'static str>, MountError> {
        self.log.push("early".into());
        if self.fails(Step::Early) {
            return Err(MountError {
                fstype: "proc",
                target: PathBuf::from("/proc"),
                source: Fake::io("mount"),
            });
        }
        Ok(vec!["/proc"])
    }

    fn unpacked_whole(&mut self, marker: Option<&TargetPath>) -> Result<(), Truncated> {
        self.log.push(format!(
            "unpacked-whole {}",
            marker.map_or("-", TargetPath::as_str)
        ));
        if self.fails(Step::Truncated) {
            return Err(Truncated {
                why: "Initramfs unpacking failed: write error".into(),
                memory: None,
            });
        }
        Ok(())
    }

    fn cmdline(&mut self) -> io::Result<Vec<u8>> {
        self.log.push("cmdline".into());
        if self.fails(Step::Cmdline) {
            return Err(Fake::io("read"));
        }
        Ok(Vec::new())
    }

    fn load_config(&mut self, _cmdline: &[u8]) -> Loaded {
        self.log.push("config".into());
        Loaded {
            config: self.config.clone(),
            from_file: true,
            error: self.config_error.take(),
        }
    }

    fn connect_host(
        &mut self,
        _host: &Host,
        _image: Option<&bootlace_contract::config::ImageRef>,
        resume: Option<&Resume>,
    ) -> Result<(), ClientError> {
        self.log.push("connect".into());
        self.resumed = resume.cloned();
        if let Some(r) = resume {
            self.seq = r.after_seq;
        }
        if self.fails(Step::Host) {
            return Err(ClientError::Unreachable {
                attempts: 3,
                elapsed: Duration::from_millis(3000),
                last: Fake::io("connect"),
            });
        }
        self.connected = true;
        Ok(())
    }

    fn host_connected(&self) -> bool {
        self.connected
    }

    fn host_seq(&self) -> Option<u64> {
        self.connected.then_some(self.seq)
    }

    fn prepare_init(&mut self) -> Result<Option<Prepared>, TakeoverError> {
        self.log.push("prepare-init".into());
        if self.fails(Step::Prepare) {
            return Err(TakeoverError::SelfCheck {
                path: PathBuf::from("/run/bootlace/init.next"),
                why: "it exited with status 1".into(),
            });
        }
        Ok(self.next_init.clone())
    }

    fn exec_init(&mut self, next: &Prepared, state: &Handover) -> TakeoverError {
        self.log.push(format!("exec-init {}", next.version));
        if self.fails(Step::ExecInit) {
            return TakeoverError::Exec {
                path: next.path.clone(),
                source: io::Error::from(io::ErrorKind::PermissionDenied),
            };
        }
        self.ended(End::TookOver(Box::new(state.clone())))
    }

    fn take_handover(&mut self, path: &Path) -> Result<Handover, TakeoverError> {
        self.log.push(format!("take-handover {}", path.display()));
        if self.fails(Step::Handover) {
            return Err(TakeoverError::State(StateError::Invalid {
                path: path.display().to_string(),
                message: "state version 9 (this init reads 1)".into(),
            }));
        }
        self.handover.clone().ok_or_else(|| {
            TakeoverError::State(StateError::Read {
                path: path.display().to_string(),
                source: io::Error::from(io::ErrorKind::NotFound),
            })
        })
    }

    fn report(&mut self, kind: Kind, fields: &[(&str, String)]) {
        if !self.connected {
            return;
        }
        let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.log.push(format!("{kind} {}", fields.join(" ")));
        self.seq += 1;
        self.clock_ms += 1;
    }

    fn load_modules(&mut self, names: &[ModuleName]) -> Result<Vec<String>, ModLoadError> {
        self.log.push(format!("modules {}", names.len()));
        if self.fails(Step::Modules) {
            return Err(ModLoadError::Index(KmodError::NotFound {
                name: "nope".into(),
                dir: PathBuf::from("/lib/modules/x"),
            }));
        }
        Ok(names.iter().map(|n| n.as_str().to_owned()).collect())
    }

    fn switch_root(&mut self, _stage1: &Stage1) -> Stage1Error {
        self.log.push("switch_root".into());
        if self.fails(Step::Switch) {
            return Stage1Error::NoRoot;
        }
        self.ended(End::Switched)
    }

    fn writable(&mut self, root: &RootFs) -> Result<(), ApplyError> {
        self.log.push(format!("writable {}", root.writable.len()));
        if self.fails(Step::Writable) {
            return Err(ApplyError::Mount {
                path: "/etc".into(),
                what: "tmpfs".into(),
                source: Some(Fake::io("mount")),
            });
        }
        Ok(())
    }

    fn find_bootstrap(&mut self, _cfg: &Bootstrap) -> Result<Option<Found>, BootstrapError> {
        self.log.push("find".into());
        if self.fails(Step::Find) {
            return Err(BootstrapError::NotFound {
                probed: "9p (saw no 9p shares)".into(),
            });
        }
        Ok(self.found.clone())
    }

    fn mount_bootstrap(&mut self, found: &Found, _c: &InitConfig) -> Result<(), BootstrapError> {
        self.log.push(format!("mount {found}"));
        if self.fails(Step::Mount) {
            return Err(BootstrapError::Mount {
                what: found.to_string(),
                source: Fake::io("mount"),
            });
        }
        Ok(())
    }

    fn apply_bootstrap(
        &mut self,
        config: &InitConfig,
    ) -> Result<(InitConfig, Applied), BootstrapError> {
        self.log.push("apply".into());
        if self.fails(Step::ApplyManifest) {
            return Err(BootstrapError::Manifest(ManifestError::Parse {
                path: PathBuf::from("/.bootstrap/bootlace.toml"),
                message: "unknown field `bogus`".into(),
            }));
        }
        if self.fails(Step::Apply) {
            return Err(BootstrapError::Apply(ApplyError::Command {
                name: "setup".into(),
                outcome: "exited with status 1".into(),
            }));
        }
        let mut cfg = config.clone();
        if let Some((k, v)) = &self.manifest_env {
            cfg.handoff.env.insert(
                k.clone().try_into().expect("name"),
                v.clone().try_into().expect("value"),
            );
        }
        let applied = Applied {
            instance_id: Some("i-7".into()),
            ..Applied::default()
        };
        Ok((cfg, applied))
    }

    fn cleanup_bootstrap(&mut self) -> Result<Cleaned, BootstrapError> {
        self.log.push("cleanup".into());
        if self.fails(Step::Cleanup) {
            return Err(BootstrapError::Cleanup {
                what: "still mounted: /.bootstrap".into(),
                source: None,
            });
        }
        Ok(Cleaned::Removed)
    }

    fn identity(
        &mut self,
        _config: &InitConfig,
        instance_id: Option<&str>,
    ) -> Result<(), IdentityError> {
        self.log
            .push(format!("identity {}", instance_id.unwrap_or("-")));
        Ok(())
    }

    fn exec(&mut self, cmd: &Command, env: &[(String, String)], run_as: &RunAs) -> io::Error {
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.log.push(format!(
            "exec {cmd} [{}]{}",
            env.join(" "),
            run_as.describe()
        ));
        if self.fails(Step::Exec) {
            return io::Error::from(io::ErrorKind::NotFound);
        }
        self.ended(End::Exec(cmd.to_string()))
    }

    fn supervise(
        &mut self,
        cmd: &Command,
        _env: &[(String, String)],
        run_as: &RunAs,
        _grace: Duration,
    ) -> io::Result<AppEnd> {
        self.log
            .push(format!("supervise {cmd}{}", run_as.describe()));
        self.app.take().ok_or_else(|| Fake::io("supervise"))
    }

    fn shell(&mut self, _env: &[(String, String)], _grace: Duration) {
        self.log.push("shell".into());
    }

    fn sync(&mut self) {
        self.log.push("sync".into());
    }

    fn vm_hwm_kb(&self) -> u64 {
        1234
    }

    fn memory_kb(&self) -> Option<(u64, u64)> {
        Some((240_000, 61_000))
    }

    fn power_off(&mut self, status: ExitStatus, summary: &str) -> ! {
        self.log.push(format!("power-off {status}"));
        self.ended(End::PowerOff(status.code(), summary.to_owned()))
    }
}

/// A config with a host and a 9p bootstrap, exec hand-off.
fn hosted() -> InitConfig {
    let mut c = InitConfig::default();
    c.host.address = "vsock:2:1024".parse().ok();
    c.bootstrap.sources = vec![Source::NineP];
    c
}

#[test]
fn a_good_boot_reports_ready_before_the_cleanup_and_execs_with_the_manifest_env() {
    let mut f = Fake::new(hosted());
    f.manifest_env = Some(("APP".into(), "1".into()));
    let f = f.boot();
    assert_eq!(f.end, Some(End::Exec("/sbin/init".into())), "{:#?}", f.log);
    // The order of the steps.
    let order = [
        "early",
        "cmdline",
        "config",
        "connect",
        "STEP STEP=host",
        "STEP STEP=config",
        "modules",
        "find",
        "STEP STEP=bootstrap_found",
        "mount 9p share",
        "STEP STEP=bootstrap_mounted STATE=finished",
        "apply",
        "STEP STEP=manifest_done STATE=finished",
        "READY",
        "cleanup",
        "STEP STEP=cleanup_done STATE=finished",
        "exec /sbin/init",
    ];
    let at: Vec<usize> = order.iter().map(|p| f.at(p)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "{order:?} at {at:?}:\n{:#?}",
        f.log
    );
    // READY once, with the timeline so far (no cleanup in it) and the hand-off it will do.
    let ready = f.entries("READY");
    assert_eq!(ready.len(), 1, "{:#?}", f.log);
    assert!(
        ready[0].contains("STATUS=hand-off: exec /sbin/init"),
        "{}",
        ready[0]
    );
    assert!(
        ready[0].contains("entry=0.000s")
            && ready[0].contains("manifest_done=")
            && !ready[0].contains("cleanup_done="),
        "{}",
        ready[0]
    );
    assert!(ready[0].contains("VMHWM_KB=1234"), "{}", ready[0]);
    assert!(
        ready[0].contains("MEM_TOTAL_KB=240000 MEM_PEAK_KB=61000"),
        "{}",
        ready[0]
    );
    assert!(f.entries("exec")[0].contains("APP=1"), "{:#?}", f.log);
    assert!(!f.has("FAILED"), "{:#?}", f.log);
}

#[test]
fn a_failed_mount_is_cleaned_up_reported_and_powers_off() {
    let f = Fake::new(hosted()).failing(&[Step::Mount]).boot();
    assert_eq!(f.powered_off().0, 71);
    assert!(f.at("mount") < f.at("cleanup") && f.at("cleanup") < f.at("FAILED"));
    let failed = f.entries("FAILED")[0];
    assert!(
        failed.contains("STATUS=bootstrap: mount 9p share \"bootlace\" on /.bootstrap")
            && failed.contains("EXIT_STATUS=71")
            && failed.contains("POLICY=poweroff")
            && failed.contains("MEM_PEAK_KB=61000"),
        "{failed}"
    );
    assert!(f.has("STEP STEP=bootstrap_mounted STATE=failed"));
    assert!(
        !f.has("apply") && !f.has("READY") && !f.has("exec"),
        "{:#?}",
        f.log
    );
}

#[test]
fn an_invalid_manifest_is_a_config_error_and_nothing_is_ready() {
    let f = Fake::new(hosted()).failing(&[Step::ApplyManifest]).boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 78, "{text}");
    assert!(
        text.starts_with("bootstrap: manifest: /.bootstrap/bootlace.toml"),
        "{text}"
    );
    assert!(f.at("apply") < f.at("cleanup"));
    assert!(f.has("STEP STEP=manifest_done STATE=failed"));
    assert!(!f.has("READY"), "{:#?}", f.log);
}

#[test]
fn a_bad_config_is_reported_to_the_host_before_anything_else_runs() {
    let mut f = Fake::new(hosted());
    f.config_error = Some(ConfigError::UnknownKey {
        key: "bootlace.bogus".into(),
    });
    let f = f.boot();
    assert_eq!(f.powered_off().0, 78);
    assert!(f.at("connect") < f.at("FAILED"));
    assert!(f.entries("FAILED")[0].contains("bootlace.bogus"));
    assert!(!f.has("modules") && !f.has("find"), "{:#?}", f.log);
}

#[test]
fn the_first_early_failure_wins() {
    let f = Fake::new(hosted())
        .failing(&[Step::Early, Step::Cmdline])
        .boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 71);
    assert!(
        text.starts_with("early mounts: mount proc on /proc"),
        "{text}"
    );
    let f = Fake::new(hosted()).failing(&[Step::Cmdline]).boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 78);
    assert!(
        text.starts_with("config: cannot read /proc/cmdline"),
        "{text}"
    );
}

#[test]
fn a_truncated_initramfs_is_reported_before_the_config_it_explains() {
    let mut c = hosted();
    c.root.unpacked_marker =
        Some(TargetPath::try_from("/etc/bootlace/unpacked".to_owned()).expect("path"));
    let mut f = Fake::new(c).failing(&[Step::Truncated]);
    f.config_error = Some(ConfigError::UnknownKey {
        key: "bootlace.bogus".into(),
    });
    let f = f.boot();
    assert!(
        f.has("unpacked-whole /etc/bootlace/unpacked"),
        "{:#?}",
        f.log
    );
    let (status, text) = f.powered_off();
    assert_eq!(status, 71);
    assert!(
        text.starts_with(
            "the initramfs was not unpacked whole (Initramfs unpacking failed: write error)"
        ),
        "{text}"
    );
    assert!(!f.has("find") && !f.has("modules"), "{:#?}", f.log);
}

#[test]
fn continue_goes_on_to_the_hand_off_with_the_original_config_and_one_ready() {
    let mut c = hosted();
    c.on_failure = FailurePolicy::Continue;
    let mut f = Fake::new(c).failing(&[Step::Modules, Step::Apply]);
    f.manifest_env = Some(("APP".into(), "1".into()));
    let f = f.boot();
    assert_eq!(f.end, Some(End::Exec("/sbin/init".into())), "{:#?}", f.log);
    let failed = f.entries("FAILED");
    assert_eq!(failed.len(), 2, "{failed:#?}");
    assert!(
        failed[0].contains("STATUS=modules: module \"nope\" not found"),
        "{}",
        failed[0]
    );
    assert!(
        failed[1].contains("run: setup: exited with status 1"),
        "{}",
        failed[1]
    );
    assert!(failed.iter().all(|l| l.contains("POLICY=continue")));
    assert_eq!(f.entries("READY").len(), 1);
    assert!(
        f.at("cleanup") < f.at("READY"),
        "READY at the hand-off: {:#?}",
        f.log
    );
    assert!(
        !f.entries("exec")[0].contains("APP=1"),
        "the manifest's env was applied"
    );
}

#[test]
fn cleanup_failures_after_ready_fail_the_boot_and_the_first_error_wins() {
    let f = Fake::new(hosted()).failing(&[Step::Cleanup]).boot();
    assert_eq!(f.powered_off().0, 71);
    assert!(f.at("READY") < f.at("FAILED"));
    assert!(f.entries("FAILED")[0].contains("cleanup of /.bootstrap: still mounted"));

    let f = Fake::new(hosted())
        .failing(&[Step::Apply, Step::Cleanup])
        .boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 71);
    assert!(
        text.contains("run: setup"),
        "the apply error is reported: {text}"
    );
    assert_eq!(f.entries("FAILED").len(), 1);
}

#[test]
fn shell_policy_runs_a_shell_then_powers_off() {
    let mut c = hosted();
    c.on_failure = FailurePolicy::Shell;
    let f = Fake::new(c).failing(&[Step::Find]).boot();
    assert_eq!(f.powered_off().0, 71);
    assert!(f.at("FAILED") < f.at("shell") && f.at("shell") < f.at("power-off"));
    assert!(!f.has("exec"));
}

#[test]
fn an_unreachable_host_powers_off_without_going_further() {
    let f = Fake::new(hosted()).failing(&[Step::Host]).boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 71);
    assert!(
        text.starts_with("host: host unreachable after 3 attempts"),
        "{text}"
    );
    assert!(!f.has("modules"), "{:#?}", f.log);
}

#[test]
fn exec_failures_report_127_for_a_missing_program() {
    let f = Fake::new(hosted()).failing(&[Step::Exec]).boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 127);
    assert!(
        text.starts_with("hand-off: cannot execute /sbin/init"),
        "{text}"
    );
    assert!(f.at("exec") < f.at("FAILED"));
}

#[test]
fn a_supervised_app_ends_with_sync_exit_report_and_its_status() {
    let mut c = hosted();
    c.handoff.mode = HandoffMode::Supervise;
    c.handoff.command = Command::try_from(vec!["/bin/app".to_owned()]).expect("command");
    let mut f = Fake::new(c);
    f.app = Some(AppEnd::Ended(Ended::Exited(3)));
    let f = f.boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 3);
    assert_eq!(text, "app /bin/app exited with status 3");
    assert!(f.at("supervise") < f.at("sync") && f.at("sync") < f.at("EXIT EXIT_STATUS=3"));

    let mut c = hosted();
    c.handoff.mode = HandoffMode::Supervise;
    let mut f = Fake::new(c);
    f.app = Some(AppEnd::Ended(Ended::Signaled(9)));
    assert_eq!(f.boot().powered_off().0, 137);
}

#[test]
fn a_poweroff_handoff_runs_nothing_sets_no_identity_and_powers_off_with_0() {
    let mut c = hosted();
    c.handoff.mode = HandoffMode::Poweroff;
    let f = Fake::new(c).boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 0);
    assert_eq!(text, "configuration applied; hand-off poweroff");
    assert!(!f.has("exec") && !f.has("supervise"), "{:#?}", f.log);
    assert!(!f.has("identity"), "{:#?}", f.log);
    assert!(f.at("READY") < f.at("sync") && f.at("sync") < f.at("EXIT EXIT_STATUS=0"));
}

#[test]
fn the_handoff_runs_in_its_workdir_with_its_credentials_in_both_modes() {
    let mut c = hosted();
    c.handoff.workdir = "/srv/app".parse().ok();
    c.handoff.user = UnixId::try_from(1000).ok();
    c.handoff.group = UnixId::try_from(100).ok();
    c.handoff.groups = [10, 20]
        .into_iter()
        .filter_map(|g| UnixId::try_from(g).ok())
        .collect();
    let f = Fake::new(c.clone()).boot();
    let exec = f.entries("exec");
    assert!(
        exec[0].ends_with("] in /srv/app as 1000:100 (groups 10,20)"),
        "{exec:?}"
    );
    let ready = f.entries("READY");
    assert!(
        ready[0].contains("STATUS=hand-off: exec /sbin/init in /srv/app as 1000:100"),
        "{ready:?}"
    );
    c.handoff.mode = HandoffMode::Supervise;
    c.handoff.group = None;
    c.handoff.groups.clear();
    let mut f = Fake::new(c);
    f.app = Some(AppEnd::Ended(Ended::Exited(0)));
    let f = f.boot();
    assert!(
        f.has("supervise /sbin/init in /srv/app as 1000:0"),
        "{:#?}",
        f.log
    );
    // Nothing set: `/` as root, as before (nothing added to the line).
    let f = Fake::new(hosted()).boot();
    assert!(f.entries("exec")[0].ends_with(']'), "{:#?}", f.log);
}

#[test]
fn a_failed_switch_of_root_powers_off_even_under_continue() {
    let c = InitConfig {
        on_failure: FailurePolicy::Continue,
        stage1: Some(Stage1::default()),
        ..InitConfig::default()
    };
    let f = Fake::new(c.clone()).failing(&[Step::Switch]).boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 71);
    assert!(text.starts_with("stage1: no root given"), "{text}");
    assert!(!f.has("find") && !f.has("exec"));
    let f = Fake::new(c).boot();
    assert_eq!(f.end, Some(End::Switched));
}

#[test]
fn an_optional_bootstrap_that_is_absent_mounts_and_cleans_nothing() {
    let mut c = hosted();
    c.bootstrap.required = false;
    let mut f = Fake::new(c);
    f.found = None;
    let f = f.boot();
    assert!(matches!(f.end, Some(End::Exec(_))));
    assert!(
        !f.has("mount") && !f.has("cleanup") && !f.has("apply"),
        "{:#?}",
        f.log
    );
    assert_eq!(f.entries("READY").len(), 1);
}

#[test]
fn writable_locations_come_before_the_bootstrap() {
    let mut c = hosted();
    c.root.writable = vec![TargetPath::try_from("/etc".to_owned()).expect("path")];
    let f = Fake::new(c.clone()).boot();
    assert!(f.at("writable 1") < f.at("find"));
    let f = Fake::new(c).failing(&[Step::Writable]).boot();
    let (status, text) = f.powered_off();
    assert_eq!(status, 71);
    assert!(text.starts_with("root: mounts: /etc: tmpfs"), "{text}");
}

#[test]
fn the_identity_is_set_after_the_manifest_with_its_instance_id_before_ready() {
    let f = Fake::new(hosted()).boot();
    assert!(f.at("apply") < f.at("identity i-7"), "{:#?}", f.log);
    // Before READY: nothing after it holds the hand-off.
    assert!(f.at("identity i-7") < f.at("READY "), "{:#?}", f.log);
    assert!(matches!(f.end, Some(End::Exec(_))));
    // Without a bootstrap there is no instance id: the identity is still set.
    let f = Fake::new(InitConfig::default()).boot();
    assert!(f.has("identity -"), "{:#?}", f.log);
}

#[test]
fn without_a_host_nothing_is_reported_and_the_boot_still_ends_cleanly() {
    let mut c = InitConfig::default();
    c.bootstrap.sources = vec![Source::Disk];
    let f = Fake::new(c).failing(&[Step::Find]).boot();
    assert!(!f.has("connect"));
    assert_eq!(f.powered_off().0, 71);
    assert!(!f
        .log
        .iter()
        .any(|l| l.starts_with("FAILED") || l.starts_with("STEP")));
}

fn newer_init() -> Prepared {
    Prepared {
        path: PathBuf::from("/run/bootlace/init.next"),
        version: "0.2.0".into(),
        sha256: Sha256Digest::from_bytes(&[7; 32]),
        bytes: 1_400_000,
    }
}

#[test]
fn a_newer_init_takes_over_once_the_bootstrap_is_mounted_and_before_the_manifest() {
    let mut f = Fake::new(hosted());
    f.next_init = Some(newer_init());
    let f = f.boot();
    let Some(End::TookOver(state)) = &f.end else {
        panic!("no takeover: {:#?}", f.log)
    };
    let order = [
        "STEP STEP=bootstrap_mounted",
        "prepare-init",
        "STEP STEP=init_handover STATE=finished",
        "exec-init 0.2.0",
    ];
    let at: Vec<usize> = order.iter().map(|p| f.at(p)).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{:#?}", f.log);
    assert!(f.entries("STEP STEP=init_handover")[0].contains("NEXT_VERSION=0.2.0"));
    // Nothing of the manifest, no READY, no cleanup: the newer init does those.
    assert!(
        !f.has("apply") && !f.has("READY") && !f.has("cleanup"),
        "{:#?}",
        f.log
    );
    assert_eq!(state.from_version, bootlace_init::VERSION);
    assert_eq!(state.stage, Stage::BootstrapMounted);
    assert_eq!(
        state.host_seq,
        Some(f.seq),
        "every report sent is in the state"
    );
    let names: Vec<&str> = state.timeline.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"entry"));
    assert_eq!(names.last(), Some(&"init_handover"));
    assert!(names.contains(&"bootstrap_mounted"), "{names:?}");
    assert_eq!(state.bootstrap, "9p share \"bootlace\"");
}

#[test]
fn a_newer_init_that_fails_its_checks_or_its_exec_is_reported_and_this_one_goes_on() {
    for step in [Step::Prepare, Step::ExecInit] {
        let mut f = Fake::new(hosted()).failing(&[step]);
        f.next_init = Some(newer_init());
        let f = f.boot();
        assert_eq!(f.end, Some(End::Exec("/sbin/init".into())), "{:#?}", f.log);
        let failed = f.entries("STEP STEP=init_takeover STATE=failed");
        assert_eq!(failed.len(), 1, "{step:?}: {:#?}", f.log);
        let why = match step {
            Step::Prepare => "the self-check of /run/bootlace/init.next failed",
            _ => "execute /run/bootlace/init.next",
        };
        assert!(failed[0].contains(why), "{}", failed[0]);
        assert!(f.at("STEP STEP=init_takeover") < f.at("apply"));
        assert_eq!(f.entries("READY").len(), 1, "{:#?}", f.log);
        assert!(!f.has("FAILED"), "a fallback is no failure: {:#?}", f.log);
    }
}

#[test]
fn a_bundle_without_a_newer_init_boots_as_before() {
    let f = Fake::new(hosted()).boot();
    assert!(f.has("prepare-init"), "{:#?}", f.log);
    assert!(!f.has("STEP STEP=init_"), "{:#?}", f.log);
    assert_eq!(f.end, Some(End::Exec("/sbin/init".into())));
}

fn handover(host_seq: Option<u64>) -> Handover {
    Handover {
        state_version: bootlace_contract::takeover::STATE_VERSION,
        from_version: "0.1.0".into(),
        stage: Stage::BootstrapMounted,
        timeline: vec![
            Stamp {
                name: "entry".into(),
                ns: 2_000_000_000,
            },
            Stamp {
                name: "bootstrap_mounted".into(),
                ns: 3_000_000_000,
            },
            Stamp {
                name: "init_handover".into(),
                ns: 4_750_000_000,
            },
        ],
        host_seq,
        bootstrap: "the host's bundle over vsock".into(),
    }
}

#[test]
fn the_newer_init_resumes_the_session_and_the_timeline_and_finishes_the_bootstrap() {
    let mut f = Fake::new(hosted());
    f.handover = Some(handover(Some(6)));
    let f = f.resume();
    assert_eq!(f.end, Some(End::Exec("/sbin/init".into())), "{:#?}", f.log);
    assert_eq!(
        f.resumed,
        Some(Resume {
            after_seq: 6,
            from_version: "0.1.0".into()
        })
    );
    let order = [
        "take-handover /run/state",
        "connect",
        "STEP STEP=init_takeover STATE=finished DURATION_MS=250 FROM_VERSION=0.1.0",
        "apply",
        "READY",
        "cleanup",
        "exec /sbin/init",
    ];
    let at: Vec<usize> = order.iter().map(|p| f.at(p)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "{order:?} {at:?}: {:#?}",
        f.log
    );
    // Not again: the host step, the config step, the modules, the search, the mount.
    for again in [
        "STEP STEP=host",
        "STEP STEP=config",
        "modules",
        "find",
        "mount",
        "prepare-init",
    ] {
        assert!(!f.has(again), "{again}: {:#?}", f.log);
    }
    let ready = f.entries("READY")[0];
    assert!(
        ready.contains(
            "entry=2.000s bootstrap_mounted=3.000s init_handover=4.750s init_takeover=5.000s"
        ),
        "{ready}"
    );
    // Numbered after the previous init's six reports.
    assert_eq!(
        f.seq,
        6 + f
            .log
            .iter()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_uppercase()))
            .count() as u64
    );
}

#[test]
fn a_state_that_cannot_be_taken_is_a_reported_boot_failure() {
    let mut f = Fake::new(hosted()).failing(&[Step::Handover]);
    f.handover = Some(handover(None));
    let f = f.resume();
    assert_eq!(f.powered_off().0, 71, "{:#?}", f.log);
    let failed = f.entries("FAILED")[0];
    assert!(
        failed.contains("the takeover state /run/state is refused"),
        "{failed}"
    );
    assert!(!f.has("apply"), "{:#?}", f.log);
}
