//! Task definitions: a TOML file naming an image, the resources of each guest, how many
//! guests, the configuration of each (a bundle, a hostname, variables) and a restart policy.
//! `bootlace-vm up TASK` runs it ([`crate::up`]). The schema is documented in docs/task.md;
//! [`Task::read`] checks it whole before anything starts, and every error names the file and
//! the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::restart::{Policy, Restart};
use crate::Uuid;

/// Most guests one task may run.
pub const MAX_COUNT: u32 = 256;
/// The delay before a restart unless `restart.delay_ms` says otherwise.
pub const DEFAULT_RESTART_DELAY: Duration = Duration::from_millis(1000);

/// A task file as written (unknown keys refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    name: Option<String>,
    image: String,
    images: Option<PathBuf>,
    count: Option<u32>,
    cpus: Option<u32>,
    memory: Option<u32>,
    timeout: Option<u64>,
    port: Option<u32>,
    bundle: Option<PathBuf>,
    hostname: Option<String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    command: Option<Vec<String>>,
    init: Option<PathBuf>,
    #[serde(default)]
    append: Vec<String>,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    instance: BTreeMap<String, RawInstance>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    #[serde(default)]
    policy: Policy,
    max: Option<u32>,
    delay_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    bundle: Option<PathBuf>,
    hostname: Option<String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    command: Option<Vec<String>>,
    init: Option<PathBuf>,
}

/// A task, checked: what `bootlace-vm up` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The task file.
    pub file: PathBuf,
    /// The task's name (`name`, else the file's stem): guests are `NAME-1` … `NAME-COUNT`.
    pub name: String,
    /// The image's name.
    pub image: String,
    /// The version asked for (`None`: the default version).
    pub version: Option<String>,
    /// The images directory (`images`, relative to the task file), if the file gives one.
    pub images: Option<PathBuf>,
    /// vCPUs of each guest.
    pub cpus: u32,
    /// Memory of each guest in MiB (`None`: bootlace-vm's default, raised to the image's need).
    pub memory_mib: Option<u32>,
    /// Hard limit on each run (`None`: none).
    pub timeout: Option<Duration>,
    /// The vsock port the guests dial for their host agent.
    pub port: u32,
    /// Kernel parameters added for every guest.
    pub append: Vec<String>,
    /// The restart policy.
    pub restart: Restart,
    /// The guests, in order.
    pub instances: Vec<Instance>,
}

/// One guest of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Its number, 1 to `count`.
    pub n: u32,
    /// Its name: `TASK-N`.
    pub name: String,
    /// The base bundle (directory, tar, tar.gz, tar.zst), if any.
    pub bundle: Option<PathBuf>,
    /// The hostname written into its bundle.
    pub hostname: String,
    /// Variables added to its bundle's `[env]`.
    pub vars: BTreeMap<String, String>,
    /// The application that replaces the image's command (supervised: the guest ends with
    /// it), `{n}` and `{task}` filled in; `None`: the image's (or its bundle's).
    pub command: Option<Vec<String>>,
    /// A newer bootlace-init its bundle carries, to take over PID 1 at boot (`init`, relative
    /// to the task file).
    pub init: Option<PathBuf>,
    /// Its SMBIOS UUID, derived from the task's name and its number: the same on every run,
    /// so a restarted guest keeps its machine ID.
    pub uuid: Uuid,
}

/// Why a task file cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The file cannot be read.
    #[error("cannot read the task file {}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the schema (an unknown key, a wrong type): the parser's message names
    /// the key and the line.
    #[error("{}: {}", file.display(), message.trim_end())]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value the schema allows but a task cannot use.
    #[error("{}: {key}: {why}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key (`count`, `restart.max`, `instance.3.hostname`).
        key: String,
        /// What is wrong.
        why: String,
    },
}

impl Task {
    /// Reads and checks the task file `file`.
    pub fn read(file: &Path) -> Result<Task, TaskError> {
        let text = std::fs::read_to_string(file).map_err(|source| TaskError::Read {
            file: file.to_owned(),
            source,
        })?;
        Task::parse(&text, file)
    }

    /// Checks the task `text` read from `file` (relative paths in it are relative to the
    /// file's directory).
    pub fn parse(text: &str, file: &Path) -> Result<Task, TaskError> {
        let raw: RawTask = toml::from_str(text).map_err(|e| TaskError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        Checker { file }.task(raw)
    }
}

/// Checks a raw task; every error names `file`.
struct Checker<'a> {
    file: &'a Path,
}

impl Checker<'_> {
    fn bad(&self, key: impl Into<String>, why: impl Into<String>) -> TaskError {
        TaskError::Invalid {
            file: self.file.to_owned(),
            key: key.into(),
            why: why.into(),
        }
    }

    /// A path of the file, relative to its directory.
    fn rel(&self, p: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_owned(),
        }
    }

    fn task(&self, raw: RawTask) -> Result<Task, TaskError> {
        let name = self.name(raw.name.as_deref())?;
        let (image, version) = self.image(&raw.image)?;
        let count = self.range("count", raw.count.unwrap_or(1), 1, MAX_COUNT)?;
        let cpus = self.range("cpus", raw.cpus.unwrap_or(1), 1, 64)?;
        let memory_mib = match raw.memory {
            Some(m) => Some(self.range("memory", m, 64, 1 << 20)?),
            None => None,
        };
        let timeout = match raw.timeout {
            Some(0) => return Err(self.bad("timeout", "must be at least 1 (seconds)")),
            t => t.map(Duration::from_secs),
        };
        let port = raw
            .port
            .unwrap_or(bootlace_contract::protocol::DEFAULT_PORT);
        if port == 0 || port == u32::MAX {
            return Err(self.bad(
                "port",
                format!("{port} is not a vsock port a guest can dial"),
            ));
        }
        if let Some(a) = raw.append.iter().find(|a| a.trim().is_empty()) {
            return Err(self.bad("append", format!("{a:?} is an empty kernel parameter")));
        }
        let restart = self.restart(&raw.restart)?;
        let instances = self.instances(&raw, &name, count)?;
        Ok(Task {
            file: self.file.to_owned(),
            name,
            image,
            version,
            images: raw.images.as_deref().map(|p| self.rel(p)),
            cpus,
            memory_mib,
            timeout,
            port,
            append: raw.append,
            restart,
            instances,
        })
    }

    fn name(&self, name: Option<&str>) -> Result<String, TaskError> {
        let (name, key) = match name {
            Some(n) => (n.to_owned(), "name"),
            None => (
                self.file
                    .file_stem()
                    .map(|s| s.to_string_lossy().trim_end_matches(".task").to_owned())
                    .unwrap_or_default(),
                "name (from the file name)",
            ),
        };
        let ok = !name.is_empty()
            && name.len() <= 48
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            return Err(self.bad(
                key,
                format!("{name:?} must be 1 to 48 letters, digits, '-', '_' or '.'"),
            ));
        }
        Ok(name)
    }

    fn image(&self, image: &str) -> Result<(String, Option<String>), TaskError> {
        let (name, version) = match image.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (image, None),
        };
        let fine = |s: &str| !s.is_empty() && !s.contains(['@', '/', ' ']);
        if !fine(name) || version.is_some_and(|v| !fine(v)) {
            return Err(self.bad(
                "image",
                format!("{image:?} is not NAME or NAME@VERSION (as bootlace-image bake --name --version wrote them)"),
            ));
        }
        Ok((name.to_owned(), version.map(str::to_owned)))
    }

    fn range(&self, key: &str, v: u32, min: u32, max: u32) -> Result<u32, TaskError> {
        if (min..=max).contains(&v) {
            Ok(v)
        } else {
            Err(self.bad(key, format!("{v} is not in {min} to {max}")))
        }
    }

    fn restart(&self, raw: &RawRestart) -> Result<Restart, TaskError> {
        if raw.policy == Policy::No && raw.max.is_some() {
            return Err(self.bad(
                "restart.max",
                "applies to the on-failure and always policies; policy is \"no\"",
            ));
        }
        Ok(Restart {
            policy: raw.policy,
            max: raw.max,
            delay: raw
                .delay_ms
                .map_or(DEFAULT_RESTART_DELAY, Duration::from_millis),
        })
    }

    fn instances(&self, raw: &RawTask, task: &str, count: u32) -> Result<Vec<Instance>, TaskError> {
        let mut by_n: BTreeMap<u32, &RawInstance> = BTreeMap::new();
        for (key, inst) in &raw.instance {
            let n = key
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=count).contains(n))
                .ok_or_else(|| {
                    self.bad(
                        format!("instance.{key}"),
                        format!("instances are numbered 1 to {count} (count = {count})"),
                    )
                })?;
            if by_n.insert(n, inst).is_some() {
                return Err(self.bad(format!("instance.{key}"), format!("instance {n} twice")));
            }
        }
        let none = RawInstance::default();
        (1..=count)
            .map(|n| {
                let own = by_n.get(&n).copied().unwrap_or(&none);
                self.instance(raw, own, task, n)
            })
            .collect()
    }

    fn instance(
        &self,
        raw: &RawTask,
        own: &RawInstance,
        task: &str,
        n: u32,
    ) -> Result<Instance, TaskError> {
        let name = format!("{task}-{n}");
        let (template, key) = match (&own.hostname, &raw.hostname) {
            (Some(h), _) => (h.as_str(), format!("instance.{n}.hostname")),
            (None, Some(h)) => (h.as_str(), "hostname".to_owned()),
            (None, None) => ("{task}-{n}", "hostname".to_owned()),
        };
        let hostname = fill(template, task, n).map_err(|why| self.bad(key, why))?;
        let mut vars = BTreeMap::new();
        for (k, v) in &raw.vars {
            let v = fill(v, task, n).map_err(|why| self.bad(format!("vars.{k}"), why))?;
            vars.insert(k.clone(), v);
        }
        for (k, v) in &own.vars {
            let v =
                fill(v, task, n).map_err(|why| self.bad(format!("instance.{n}.vars.{k}"), why))?;
            vars.insert(k.clone(), v);
        }
        let command = match (&own.command, &raw.command) {
            (Some(c), _) => Some((c, format!("instance.{n}.command"))),
            (None, Some(c)) => Some((c, "command".to_owned())),
            (None, None) => None,
        };
        let command = match command {
            Some((c, key)) if c.is_empty() => {
                return Err(self.bad(key, "an empty command: give the program and its arguments"))
            }
            Some((c, key)) => Some(
                c.iter()
                    .map(|w| fill(w, task, n).map_err(|why| self.bad(key.clone(), why)))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        Ok(Instance {
            command,
            n,
            name,
            bundle: own
                .bundle
                .as_ref()
                .or(raw.bundle.as_ref())
                .map(|p| self.rel(p)),
            init: own.init.as_ref().or(raw.init.as_ref()).map(|p| self.rel(p)),
            hostname,
            vars,
            uuid: instance_uuid(task, n),
        })
    }
}

/// `template` with `{n}` (the instance's number) and `{task}` (the task's name) filled in;
/// `{{` and `}}` are braces. Any other `{…}` is refused (a typo is an error).
pub fn fill(template: &str, task: &str, n: u32) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(rest.get(..i).unwrap_or(""));
        let tail = rest.get(i..).unwrap_or("");
        if let Some(t) = tail.strip_prefix("{{") {
            out.push('{');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("}}") {
            out.push('}');
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{n}") {
            out.push_str(&n.to_string());
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{task}") {
            out.push_str(task);
            rest = t;
        } else {
            return Err(format!(
                "{template:?}: only {{n}} and {{task}} are filled in ({{{{ and }}}} for braces)"
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The SMBIOS UUID of instance `n` of `task`: from the sha256 of both, with the version 4 and
/// variant bits set (stable across runs, distinct across instances).
pub fn instance_uuid(task: &str, n: u32) -> Uuid {
    let d = bootlace_contract::digest::of_bytes(format!("bootlace-task:{task}:{n}").as_bytes());
    let h = d.hex();
    let hex = |r: std::ops::Range<usize>| h.get(r).unwrap_or("0").to_owned();
    let variant = u8::from_str_radix(&hex(16..17), 16).unwrap_or(0) & 0x3 | 0x8;
    let text = format!(
        "{}-{}-4{}-{variant:x}{}-{}",
        hex(0..8),
        hex(8..12),
        hex(13..16),
        hex(17..20),
        hex(20..32)
    );
    text.parse().unwrap_or_else(|_| {
        "00000000-0000-4000-8000-000000000000"
            .parse()
            .unwrap_or_else(|_| unreachable!("a literal UUID"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Task, TaskError> {
        Task::parse(text, Path::new("/srv/tasks/web.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn a_full_task() {
        let t = parse(
            r#"
image = "web@1.0"
images = "../images"
count = 3
cpus = 2
memory = 384
timeout = 600
bundle = "bundles/web"
hostname = "{task}-node-{n}"
vars = { REGION = "eu", INDEX = "{n}" }
append = ["bootlace.log=debug"]

[restart]
policy = "on-failure"
max = 2
delay_ms = 50

[instance.3]
bundle = "/abs/canary.tar.gz"
hostname = "canary"
vars = { ROLE = "canary" }
"#,
        )
        .expect("valid");
        assert_eq!(t.name, "web");
        assert_eq!(
            (t.image.as_str(), t.version.as_deref()),
            ("web", Some("1.0"))
        );
        assert_eq!(t.images.as_deref(), Some(Path::new("/srv/tasks/../images")));
        assert_eq!((t.cpus, t.memory_mib, t.port), (2, Some(384), 1024));
        assert_eq!(t.timeout, Some(Duration::from_secs(600)));
        assert_eq!(t.restart.policy, Policy::OnFailure);
        assert_eq!(t.restart.max, Some(2));
        assert_eq!(t.restart.delay, Duration::from_millis(50));
        let names: Vec<&str> = t.instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["web-1", "web-2", "web-3"]);
        let i1 = &t.instances[0];
        assert_eq!(i1.hostname, "web-node-1");
        assert_eq!(
            i1.bundle.as_deref(),
            Some(Path::new("/srv/tasks/bundles/web"))
        );
        assert_eq!(i1.vars["INDEX"], "1");
        assert_eq!(i1.vars.get("ROLE"), None);
        let i3 = &t.instances[2];
        assert_eq!(i3.hostname, "canary");
        assert_eq!(i3.bundle.as_deref(), Some(Path::new("/abs/canary.tar.gz")));
        assert_eq!(
            (i3.vars["ROLE"].as_str(), i3.vars["REGION"].as_str()),
            ("canary", "eu")
        );
        // One UUID per instance, the same every time.
        assert_ne!(i1.uuid, i3.uuid);
        assert_eq!(i1.uuid, instance_uuid("web", 1));
    }

    #[test]
    fn defaults() {
        let t = parse(r#"image = "web""#).expect("valid");
        assert_eq!(t.version, None);
        assert_eq!(t.images, None);
        assert_eq!((t.cpus, t.memory_mib, t.timeout), (1, None, None));
        assert_eq!(t.restart.policy, Policy::No);
        assert_eq!(t.restart.delay, DEFAULT_RESTART_DELAY);
        assert_eq!(t.instances.len(), 1);
        assert_eq!(t.instances[0].hostname, "web-1");
        assert_eq!(t.instances[0].bundle, None);
        // The file stem, without a .task suffix.
        let t = Task::parse(r#"image = "x""#, Path::new("db.task.toml")).expect("valid");
        assert_eq!(t.instances[0].name, "db-1");
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        for (text, want) in [
            ("image = \"web\"\ncuont = 3", "unknown field `cuont`"),
            (
                "image = \"web\"\n[restart]\npolicy = \"sometimes\"",
                "unknown variant `sometimes`",
            ),
            (
                "image = \"web\"\n[restart]\nretries = 1",
                "unknown field `retries`",
            ),
            (
                "image = \"web\"\n[instance.1]\nhost = \"x\"",
                "unknown field `host`",
            ),
            ("count = 3", "missing field `image`"),
            ("image = \"web\"\ncount = \"3\"", "invalid type"),
            ("image = \"web\"\ncount = 0", "count: 0 is not in 1 to 256"),
            ("image = \"web\"\ncpus = 0", "cpus: 0 is not in 1 to 64"),
            ("image = \"web\"\nmemory = 8", "memory: 8 is not in 64"),
            (
                "image = \"web\"\ntimeout = 0",
                "timeout: must be at least 1",
            ),
            ("image = \"web\"\nport = 0", "port: 0 is not a vsock port"),
            (
                "image = \"web@\"",
                "image: \"web@\" is not NAME or NAME@VERSION",
            ),
            ("image = \"a@b@c\"", "image: \"a@b@c\" is not NAME"),
            ("image = \"web\"\nname = \"a b\"", "name: \"a b\" must be"),
            (
                "image = \"web\"\nappend = [\"\"]",
                "append: \"\" is an empty kernel parameter",
            ),
            (
                "image = \"web\"\n[restart]\nmax = 2",
                "restart.max: applies to the on-failure and always policies",
            ),
            (
                "image = \"web\"\ncount = 2\n[instance.3]\nhostname = \"x\"",
                "instance.3: instances are numbered 1 to 2",
            ),
            (
                "image = \"web\"\n[instance.one]\nhostname = \"x\"",
                "instance.one: instances are numbered",
            ),
            (
                "image = \"web\"\nhostname = \"w-{i}\"",
                "hostname: \"w-{i}\": only {n} and {task}",
            ),
            (
                "image = \"web\"\n[instance.1]\nvars = { A = \"{x\" }",
                "instance.1.vars.A: \"{x\"",
            ),
        ] {
            let e = err(text);
            assert!(e.starts_with("/srv/tasks/web.toml: "), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let e = Task::read(Path::new("/nonexistent/t.toml")).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "cannot read the task file /nonexistent/t.toml"
        );
    }

    #[test]
    fn the_documented_task_parses() {
        let doc = include_str!("../../docs/task.md");
        let block = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block in docs/task.md");
        let t = parse(block).expect("the documented task");
        assert_eq!((t.name.as_str(), t.instances.len()), ("web", 3));
        assert_eq!(t.instances[2].hostname, "web-canary");
        assert_eq!(t.instances[1].vars["INDEX"], "2");
    }

    #[test]
    fn templates() {
        assert_eq!(fill("{task}-{n}", "web", 7).expect("fill"), "web-7");
        assert_eq!(fill("{{n}} {n}}}", "w", 2).expect("fill"), "{n} 2}");
        assert_eq!(fill("plain", "w", 2).expect("fill"), "plain");
        assert!(fill("{", "w", 1).is_err());
        assert!(fill("}", "w", 1).is_err());
        assert!(fill("{N}", "w", 1).is_err());
    }

    #[test]
    fn instance_uuids_are_uuids() {
        let u = instance_uuid("web", 1);
        let s = u.as_str();
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'4', "{s}");
        assert!(matches!(s.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{s}");
        assert_ne!(instance_uuid("web", 2), u);
        assert_ne!(instance_uuid("db", 1), u);
    }

    #[test]
    fn a_command_replaces_the_images_for_the_task_or_one_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("app.toml");
        std::fs::write(
            &f,
            "image = \"web\"\ncount = 2\ncommand = [\"/bin/app\", \"--id\", \"{task}-{n}\"]\n\
             [instance.2]\ncommand = [\"/bin/sh\", \"-c\", \"exit {n}\"]\n",
        )
        .expect("write");
        let t = Task::read(&f).expect("valid");
        assert_eq!(
            t.instances[0].command.as_deref(),
            Some(&["/bin/app".to_owned(), "--id".to_owned(), "app-1".to_owned()][..])
        );
        assert_eq!(
            t.instances[1].command.as_deref(),
            Some(&["/bin/sh".to_owned(), "-c".to_owned(), "exit 2".to_owned()][..])
        );
        std::fs::write(&f, "image = \"web\"\ncommand = []\n").expect("write");
        let e = Task::read(&f).expect_err("empty").to_string();
        assert!(e.contains("command") && e.contains("empty command"), "{e}");
    }

    #[test]
    fn a_newer_init_for_the_task_or_one_instance_is_relative_to_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("app.toml");
        std::fs::write(
            &f,
            "image = \"web\"\ncount = 3\ninit = \"inits/bootlace-init-0.2\"\n\
             [instance.2]\ninit = \"/opt/bootlace-init-0.3\"\n",
        )
        .expect("write");
        let t = Task::read(&f).expect("valid");
        let inits: Vec<Option<PathBuf>> = t.instances.iter().map(|i| i.init.clone()).collect();
        assert_eq!(
            inits,
            [
                Some(dir.path().join("inits/bootlace-init-0.2")),
                Some(PathBuf::from("/opt/bootlace-init-0.3")),
                Some(dir.path().join("inits/bootlace-init-0.2")),
            ]
        );
    }
}
