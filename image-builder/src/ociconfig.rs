//! What an OCI image says about running it — its config's `Entrypoint`, `Cmd`, `Env`,
//! `WorkingDir` and `User` — and the rules that make it the init's hand-off, as Docker and OCI
//! runtimes (runc) apply them (docs/image.md, "The image's config"):
//!
//! - the command is `Entrypoint` followed by `Cmd` (`bake --cmd` replaces `Cmd` alone, as the
//!   arguments of `docker run IMAGE ARGS` do; `--exec` replaces both, as `docker run
//!   --entrypoint` does, which also drops `Cmd`); a program without a `/` is looked up in the
//!   image's `PATH` (its `Env`'s, else Docker's default) inside the image, one with a `/` but
//!   relative is taken from the working directory; neither `Entrypoint` nor `Cmd`: no command;
//! - `Env` entries are `KEY=VALUE`, a later one replacing an earlier one of the same name;
//! - `WorkingDir` is absolute (cleaned lexically, as Docker does); default `/`;
//! - `User` is `uid`, `uid:gid`, `name`, `name:group` (or `uid:group`, `name:gid`): names are
//!   resolved against the image's `/etc/passwd` and `/etc/group` (a name that is not there is an
//!   error naming it); without a group, the group is the user's from `/etc/passwd` (0 for a
//!   uid it does not list) and the supplementary groups are those `/etc/group` lists the user's
//!   name in; with a group, that group alone. `HOME` comes from `/etc/passwd` when `Env` has none.
//!
//! Every string is checked as it is read from the JSON: not UTF-8 or holding a NUL byte is an
//! error naming the image and the field (`Cmd[1]`).

use std::fmt;

use bootlace_contract::config::{
    Command, EnvName, ExecString, HandoffMode, InitConfig, InvalidValue, UnixId, WorkDir,
};
use serde::Deserialize;

use crate::additions::{AddError, Additions};
use crate::stage::Meta;

/// The PATH a runtime gives a container whose image sets none (Docker's and containerd's), and
/// where a command's program is looked up then.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Largest `/etc/passwd` or `/etc/group` read to resolve `User`, in bytes.
pub const MAX_ACCOUNT_FILE: u64 = 4 * 1024 * 1024;

/// Why an image's run configuration cannot be used. Each names the image and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{image}: {field}: {problem}")]
pub struct RunConfigError {
    /// The image (`OCI layout ./img (config sha256:…)`).
    pub image: String,
    /// The field (`Cmd[1]`, `Env[0]`, `User`, `/etc/passwd`).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

/// The run configuration of an image: its config's `config` object, every string checked
/// (UTF-8, no NUL). Fields the image leaves out (or sets to `null`) are `None` or empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `Env`, as written (`KEY=VALUE`).
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User`.
    pub user: Option<String>,
}

/// A JSON string's bytes as the document holds them (escapes decoded), before any check: so
/// that a string that is not UTF-8 is reported naming its field, not as a parse error.
struct Raw(Vec<u8>);

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Raw, E> {
                Ok(Raw(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Raw, E> {
                Ok(Raw(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
                Ok(Raw(v.as_bytes().to_vec()))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[derive(Deserialize)]
struct RawBlob {
    #[serde(default)]
    config: Option<RawRun>,
}

#[derive(Deserialize)]
struct RawRun {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<Raw>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<Raw>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<Raw>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<Raw>,
    #[serde(rename = "User", default)]
    user: Option<Raw>,
}

impl RunConfig {
    /// Reads the run configuration from an image config blob (already checked against its
    /// descriptor and the JSON limit). `image` names the image in errors.
    pub fn from_json(bytes: &[u8], image: &str) -> Result<RunConfig, RunConfigError> {
        let blob: RawBlob = serde_json::from_slice(bytes).map_err(|e| RunConfigError {
            image: image.to_owned(),
            field: "JSON".to_owned(),
            problem: e.to_string(),
        })?;
        let Some(run) = blob.config else {
            return Ok(RunConfig::default());
        };
        let text = |field: String, raw: Raw| -> Result<String, RunConfigError> {
            let bad = |problem: &str| RunConfigError {
                image: image.to_owned(),
                field: field.clone(),
                problem: problem.to_owned(),
            };
            let s = String::from_utf8(raw.0).map_err(|_| bad("is not UTF-8"))?;
            if s.contains('\0') {
                return Err(bad("contains a NUL byte"));
            }
            Ok(s)
        };
        let list = |name: &str, raws: Option<Vec<Raw>>| {
            raws.map(|raws| {
                raws.into_iter()
                    .enumerate()
                    .map(|(i, r)| text(format!("{name}[{i}]"), r))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
        };
        Ok(RunConfig {
            entrypoint: list("Entrypoint", run.entrypoint)?,
            cmd: list("Cmd", run.cmd)?,
            env: list("Env", run.env)?.unwrap_or_default(),
            working_dir: run
                .working_dir
                .map(|r| text("WorkingDir".to_owned(), r))
                .transpose()?,
            user: run.user.map(|r| text("User".to_owned(), r)).transpose()?,
        })
    }

    /// The command: `Entrypoint` then `Cmd` (`cmd`, when given, in place of the image's `Cmd`),
    /// with where it came from (`Entrypoint + Cmd`); `None` when both are empty.
    pub fn command(&self, cmd: Option<&[String]>) -> Option<(Vec<String>, &'static str)> {
        let entrypoint = self.entrypoint.as_deref().unwrap_or_default();
        let (args, cmd_name) = match cmd {
            Some(c) => (c, "--cmd"),
            None => (self.cmd.as_deref().unwrap_or_default(), "Cmd"),
        };
        let from = match (entrypoint.is_empty(), args.is_empty()) {
            (true, true) => return None,
            (false, true) => "Entrypoint",
            (true, false) if cmd_name == "Cmd" => "Cmd",
            (true, false) => "--cmd",
            (false, false) if cmd_name == "Cmd" => "Entrypoint + Cmd",
            (false, false) => "Entrypoint + --cmd",
        };
        Some(([entrypoint, args].concat(), from))
    }

    /// `Env` as names and values, in order, a later entry replacing an earlier one of the
    /// same name.
    pub fn env(&self, image: &str) -> Result<Vec<(String, String)>, RunConfigError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, entry) in self.env.iter().enumerate() {
            let bad = |problem: String| RunConfigError {
                image: image.to_owned(),
                field: format!("Env[{i}]"),
                problem,
            };
            let (k, v) = entry
                .split_once('=')
                .ok_or_else(|| bad(format!("{entry:?} is not KEY=VALUE")))?;
            out.retain(|(name, _)| name != k);
            out.push((k.to_owned(), v.to_owned()));
        }
        Ok(out)
    }

    /// `WorkingDir`, cleaned (`.`, `..`, repeated and trailing `/` resolved lexically, as Docker
    /// does); `None` when the image gives none. A relative one is an error.
    pub fn working_dir(&self, image: &str) -> Result<Option<String>, RunConfigError> {
        match self.working_dir.as_deref() {
            None | Some("") => Ok(None),
            Some(w) if w.starts_with('/') => Ok(Some(clean(w))),
            Some(w) => Err(RunConfigError {
                image: image.to_owned(),
                field: "WorkingDir".to_owned(),
                problem: format!("{w:?} is not an absolute path"),
            }),
        }
    }
}

/// An absolute path cleaned lexically: `.` and empty components dropped, `..` taking off the
/// one before it (never above `/`).
pub fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where a command's program is: an absolute path as it is; a relative one with a `/` from
/// `workdir`; a bare name looked up in `path` (a `:`-separated list; empty and relative
/// entries skipped), the first directory where `is_executable` says yes. `Ok(None)`: not found.
pub fn find_program<E>(
    program: &str,
    path: &str,
    workdir: &str,
    mut is_executable: impl FnMut(&str) -> Result<bool, E>,
) -> Result<Option<String>, E> {
    if program.starts_with('/') {
        return Ok(Some(program.to_owned()));
    }
    if program.contains('/') {
        return Ok(Some(clean(&format!("{workdir}/{program}"))));
    }
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = clean(&format!("{dir}/{program}"));
        if is_executable(&candidate)? {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// A decimal ID: digits only (no sign), below 4294967295.
fn id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|v| *v != u32::MAX)
}

/// The entries of `/etc/passwd` (`name:password:uid:gid:gecos:home:shell`); comments, blank and
/// malformed lines are skipped, as the C library skips them.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            match f.as_slice() {
                [name, _, uid, gid, rest @ ..] if !name.is_empty() => Some(PasswdEntry {
                    name,
                    uid: id(uid)?,
                    gid: id(gid)?,
                    home: rest.get(1).copied().unwrap_or(""),
                }),
                _ => None,
            }
        })
}

/// The entries of `/etc/group` (`name:password:gid:member,member`).
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            match f.as_slice() {
                [name, _, gid, rest @ ..] if !name.is_empty() => Some(GroupEntry {
                    name,
                    gid: id(gid)?,
                    members: rest
                        .first()
                        .map(|m| m.split(',').filter(|m| !m.is_empty()).collect())
                        .unwrap_or_default(),
                }),
                _ => None,
            }
        })
}

/// Whom the command runs as: `User` resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user ID.
    pub uid: u32,
    /// The group ID.
    pub gid: u32,
    /// The supplementary group IDs.
    pub groups: Vec<u32>,
    /// The user's home directory from `/etc/passwd`, when it lists the user.
    pub home: Option<String>,
}

/// Why `User` could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// A user name `/etc/passwd` does not list (or the image has no `/etc/passwd`).
    #[error("user {name:?} is not in the image's /etc/passwd{}", if *.no_file { " (the image has none)" } else { "" })]
    NoUser {
        /// The name.
        name: String,
        /// The image has no `/etc/passwd`.
        no_file: bool,
    },
    /// A group name `/etc/group` does not list.
    #[error("group {name:?} is not in the image's /etc/group{}", if *.no_file { " (the image has none)" } else { "" })]
    NoGroup {
        /// The name.
        name: String,
        /// The image has no `/etc/group`.
        no_file: bool,
    },
    /// An ID that is no valid one (`-1`, over 4294967294), or an empty user with a group.
    #[error("{0:?} is not a user or group name or ID")]
    Bad(String),
}

/// Resolves `User` (`uid`, `uid:gid`, `name`, `name:group`, …) against the image's
/// `/etc/passwd` and `/etc/group` (`None`: the image has no such file), as runc does.
pub fn resolve_user(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<Credentials, UserError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g).filter(|g| !g.is_empty())),
        None => (user, None),
    };
    let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let entry = match (is_number(user_part), passwd) {
        (true, p) => {
            let uid = id(user_part).ok_or_else(|| UserError::Bad(user_part.to_owned()))?;
            p.and_then(|p| passwd_entries(p).find(|e| e.uid == uid))
                .ok_or(uid)
        }
        (false, _) if user_part.is_empty() => Err(0),
        (false, p) => Ok(p
            .and_then(|p| passwd_entries(p).find(|e| e.name == user_part))
            .ok_or_else(|| UserError::NoUser {
                name: user_part.to_owned(),
                no_file: p.is_none(),
            })?),
    };
    let (uid, mut gid, name, home) = match &entry {
        Ok(e) => (e.uid, e.gid, Some(e.name), Some(e.home.to_owned())),
        Err(uid) => (*uid, 0, None, None),
    };
    let mut groups = Vec::new();
    match group_part {
        Some(g) if is_number(g) => gid = id(g).ok_or_else(|| UserError::Bad(g.to_owned()))?,
        Some(g) => {
            gid = group
                .and_then(|t| group_entries(t).find(|e| e.name == g))
                .ok_or_else(|| UserError::NoGroup {
                    name: g.to_owned(),
                    no_file: group.is_none(),
                })?
                .gid;
        }
        None => {
            if let (Some(name), Some(text)) = (name, group) {
                for e in group_entries(text).filter(|e| e.members.contains(&name)) {
                    if !groups.contains(&e.gid) {
                        groups.push(e.gid);
                    }
                }
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups,
        home: home.filter(|h| h.starts_with('/')),
    })
}

/// What the bake says about the image's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfigUse {
    /// Whether the image's config applies at all (`--ignore-image-config`: no).
    pub apply: bool,
    /// The bake gives the command (`--exec`, or `[handoff] command` in `--config`): the
    /// image's `Entrypoint` and `Cmd` are not used (its `Env`, `WorkingDir` and `User` are).
    pub command_given: bool,
    /// The bake gives the hand-off mode (`--handoff`, or `[handoff] mode` in `--config`).
    pub mode_given: bool,
    /// `--cmd`: replaces the image's `Cmd`, its `Entrypoint` kept.
    pub cmd: Option<Vec<String>>,
}

impl Default for ImageConfigUse {
    fn default() -> Self {
        ImageConfigUse {
            apply: true,
            command_given: false,
            mode_given: false,
            cmd: None,
        }
    }
}

/// Why the image's config could not be applied to the hand-off.
#[derive(Debug, thiserror::Error)]
pub enum ImageConfigError {
    /// A field cannot be used (not UTF-8, a NUL, a program not in PATH, …).
    #[error(transparent)]
    Field(#[from] RunConfigError),
    /// The image could not be read for what the config needs (`/etc/passwd`, a program, the
    /// working directory).
    #[error("{image}: {what}")]
    Read {
        /// The image.
        image: String,
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<AddError>,
    },
}

/// Applies an image's run configuration to the config to bake, by the rules above: the
/// command (unless the bake gives one) in `supervise` mode (unless the bake gives the mode),
/// `Env` under the config's own `[handoff] env`, `WorkingDir` (created in the image when
/// missing, 0755 root, as Docker does) and `User` unless the config sets them. `a` reads the
/// image (confined to it) and takes the working directory. Returns a line saying what was
/// taken, or `None` when the config gives nothing.
pub fn apply(
    config: &mut InitConfig,
    run: &RunConfig,
    how: &ImageConfigUse,
    a: &mut Additions,
    image: &str,
) -> Result<Option<String>, ImageConfigError> {
    if !how.apply || *run == RunConfig::default() && how.cmd.is_none() {
        return Ok(None);
    }
    let field = |field: &str, problem: String| RunConfigError {
        image: image.to_owned(),
        field: field.to_owned(),
        problem,
    };
    let read = |what: String| {
        move |source| ImageConfigError::Read {
            image: image.to_owned(),
            what,
            source: Box::new(source),
        }
    };
    let mut taken = Vec::new();
    let env = run.env(image)?;
    let workdir = run.working_dir(image)?;
    if !how.command_given {
        if let Some((words, from)) = run.command(how.cmd.as_deref()) {
            let path = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
            let command = command_in(a, words, from, path, workdir.as_deref(), image)?;
            if !how.mode_given {
                config.handoff.mode = HandoffMode::Supervise;
            }
            taken.push(format!(
                "{} {command} ({from})",
                config.handoff.mode.as_str()
            ));
            config.handoff.command = command;
        }
    }
    let mut names = Vec::new();
    for (i, (k, v)) in env.into_iter().enumerate() {
        let bad = |e: InvalidValue| field(&format!("Env[{i}]"), e.to_string());
        let k = EnvName::try_from(k).map_err(bad)?;
        let v = ExecString::try_from(v).map_err(bad)?;
        names.push(k.as_str().to_owned());
        config.handoff.env.entry(k).or_insert(v);
    }
    if !names.is_empty() {
        taken.push(format!("Env {}", names.join(" ")));
    }
    if let (Some(w), None) = (workdir, &config.handoff.workdir) {
        let dir = WorkDir::try_from(w.clone()).map_err(|e| field("WorkingDir", e.to_string()))?;
        if w != "/" {
            a.ensure_dir(w.trim_start_matches('/'), &Meta::root(0o755))
                .map_err(read(format!("WorkingDir {w}")))?;
        }
        taken.push(format!("WorkingDir {w}"));
        config.handoff.workdir = Some(dir);
    }
    let user = run.user.as_deref().filter(|u| !u.is_empty());
    if let (Some(user), false) = (user, config.handoff.changes_credentials()) {
        taken.push(set_user(config, a, user, image)?);
    }
    Ok((!taken.is_empty()).then(|| format!("image config: {}", taken.join("; "))))
}

/// The command from `Entrypoint` and `Cmd`, its program found in the image.
fn command_in(
    a: &Additions,
    mut words: Vec<String>,
    from: &str,
    path: &str,
    workdir: Option<&str>,
    image: &str,
) -> Result<Command, ImageConfigError> {
    let first = match from {
        "Cmd" => "Cmd[0]",
        "--cmd" => "--cmd",
        _ => "Entrypoint[0]",
    };
    let field = |field: &str, problem: String| RunConfigError {
        image: image.to_owned(),
        field: field.to_owned(),
        problem,
    };
    let program = words.first().cloned().unwrap_or_default();
    let is_executable = |p: &str| {
        a.input_file_mode(p)
            .map(|m| m.is_some_and(|m| m & 0o111 != 0))
    };
    let found =
        find_program(&program, path, workdir.unwrap_or("/"), is_executable).map_err(|source| {
            ImageConfigError::Read {
                image: image.to_owned(),
                what: format!("look for {program:?}"),
                source: Box::new(source),
            }
        })?;
    let Some(found) = found else {
        return Err(field(
            first,
            format!("{program:?} is not in the image's PATH ({path})"),
        )
        .into());
    };
    if program.starts_with('/') && !is_executable(&found).unwrap_or(false) {
        log::warn!("{image}: {first}: {program} is not an executable file in the image");
    }
    if let Some(w) = words.first_mut() {
        *w = found;
    }
    Command::try_from(words).map_err(|e| field(from, e.to_string()).into())
}

/// `User` resolved against the image's `/etc/passwd` and `/etc/group` into
/// `[handoff] user`, `group` and `groups` (and `HOME`, when neither the image's `Env` nor the
/// config gives one); returns what was taken.
fn set_user(
    config: &mut InitConfig,
    a: &Additions,
    user: &str,
    image: &str,
) -> Result<String, ImageConfigError> {
    let read_file = |path: &str| {
        a.read_input_file(path, MAX_ACCOUNT_FILE)
            .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(|source| ImageConfigError::Read {
                image: image.to_owned(),
                what: format!("User {user:?}: read /{path}"),
                source: Box::new(source),
            })
    };
    let passwd = read_file("etc/passwd")?;
    let group = read_file("etc/group")?;
    let field = |problem: String| RunConfigError {
        image: image.to_owned(),
        field: "User".to_owned(),
        problem,
    };
    let c = resolve_user(user, passwd.as_deref(), group.as_deref())
        .map_err(|e| field(format!("{user:?}: {e}")))?;
    let id = |v: u32| UnixId::try_from(v).map_err(|e| field(e.to_string()));
    config.handoff.user = Some(id(c.uid)?);
    config.handoff.group = Some(id(c.gid)?);
    config.handoff.groups = c.groups.iter().map(|g| id(*g)).collect::<Result<_, _>>()?;
    if let Some(home) = c.home {
        let name = EnvName::try_from("HOME".to_owned()).map_err(|e| field(e.to_string()))?;
        if let Ok(home) = ExecString::try_from(home) {
            config.handoff.env.entry(name).or_insert(home);
        }
    }
    let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
    Ok(format!(
        "User {user} = {}:{}{}",
        c.uid,
        c.gid,
        if groups.is_empty() {
            String::new()
        } else {
            format!(" (groups {})", groups.join(","))
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGE: &str = "OCI layout t";

    fn run(json: &str) -> Result<RunConfig, RunConfigError> {
        RunConfig::from_json(json.as_bytes(), IMAGE)
    }

    fn words(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn entrypoint_and_cmd() {
        let both = run(r#"{"config":{"Entrypoint":["/usr/bin/sleep"],"Cmd":["1"]}}"#).unwrap();
        assert_eq!(
            both.command(None),
            Some((words(&["/usr/bin/sleep", "1"]), "Entrypoint + Cmd"))
        );
        // `--cmd` replaces Cmd alone; the Entrypoint stays.
        let args = words(&["5"]);
        assert_eq!(
            both.command(Some(&args)),
            Some((words(&["/usr/bin/sleep", "5"]), "Entrypoint + --cmd"))
        );
        let cmd = run(r#"{"config":{"Entrypoint":null,"Cmd":["sh","-c","x"]}}"#).unwrap();
        assert_eq!(cmd.command(None), Some((words(&["sh", "-c", "x"]), "Cmd")));
        let ep = run(r#"{"config":{"Entrypoint":["/app"],"Cmd":[]}}"#).unwrap();
        assert_eq!(ep.command(None), Some((words(&["/app"]), "Entrypoint")));
        // Neither: no command (the bake keeps its own).
        for json in [
            r#"{"architecture":"amd64"}"#,
            r#"{"config":{}}"#,
            r#"{"config":null}"#,
            r#"{"config":{"Entrypoint":[],"Cmd":null}}"#,
        ] {
            assert_eq!(run(json).unwrap().command(None), None, "{json}");
        }
    }

    #[test]
    fn env_entries() {
        let r =
            run(r#"{"config":{"Env":["PATH=/app/bin:/bin","APP=oci","A=1=2","APP=again","E="]}}"#)
                .unwrap();
        let env = r.env(IMAGE).unwrap();
        assert_eq!(
            env,
            [
                ("PATH".to_owned(), "/app/bin:/bin".to_owned()),
                ("A".to_owned(), "1=2".to_owned()),
                ("APP".to_owned(), "again".to_owned()),
                ("E".to_owned(), String::new()),
            ]
        );
        let e = run(r#"{"config":{"Env":["A=1","NOEQUALS"]}}"#)
            .unwrap()
            .env(IMAGE)
            .unwrap_err();
        assert_eq!(e.field, "Env[1]");
        assert!(
            e.to_string().contains("\"NOEQUALS\" is not KEY=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn hostile_strings_are_refused_naming_the_field() {
        // NUL through an escape, and bytes that are not UTF-8 (raw, and a lone surrogate).
        let cases: &[(&[u8], &str, &str)] = &[
            (br#"{"config":{"Cmd":["a","b\u0000c"]}}"#, "Cmd[1]", "NUL"),
            (
                br#"{"config":{"Entrypoint":["\u0000"]}}"#,
                "Entrypoint[0]",
                "NUL",
            ),
            (
                b"{\"config\":{\"Env\":[\"A=\xff\"]}}",
                "Env[0]",
                "not UTF-8",
            ),
            (b"{\"config\":{\"User\":\"\xc3\"}}", "User", "not UTF-8"),
            (
                br#"{"config":{"WorkingDir":"/a\u0000"}}"#,
                "WorkingDir",
                "NUL",
            ),
        ];
        for (json, field, want) in cases {
            let e = RunConfig::from_json(json, IMAGE).unwrap_err();
            assert_eq!(e.field, *field, "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("OCI layout t: {field}: ")),
                "{e}"
            );
            assert!(e.problem.contains(want), "{e}");
        }
        let e = RunConfig::from_json(br#"{"config":{"Cmd":["\ud800"]}}"#, IMAGE).unwrap_err();
        assert!(e.to_string().starts_with("OCI layout t: "), "{e}");
        // Wrong types are refused, not ignored.
        assert!(run(r#"{"config":{"Cmd":"sleep 1"}}"#).is_err());
        assert!(run(r#"{"config":{"User":1000}}"#).is_err());
        assert!(run("\"config\"").is_err());
    }

    #[test]
    fn working_dir() {
        let wd = |w: &str| {
            run(&format!(r#"{{"config":{{"WorkingDir":{w:?}}}}}"#))
                .unwrap()
                .working_dir(IMAGE)
        };
        assert_eq!(wd("/srv/app/").unwrap().as_deref(), Some("/srv/app"));
        assert_eq!(wd("/a/./b/../c//d").unwrap().as_deref(), Some("/a/c/d"));
        assert_eq!(wd("/../..").unwrap().as_deref(), Some("/"));
        assert_eq!(wd("").unwrap(), None);
        let e = wd("app").unwrap_err();
        assert_eq!(e.field, "WorkingDir");
        assert!(e.problem.contains("not an absolute path"), "{e}");
    }

    #[test]
    fn programs_are_found_as_a_runtime_finds_them() {
        let exists =
            |have: &'static [&'static str]| move |p: &str| Ok::<bool, ()>(have.contains(&p));
        let have: &[&str] = &["/usr/bin/sleep", "/bin/sh", "/opt/app/bin/run"];
        let find = |prog: &str, path: &str| find_program(prog, path, "/opt/app", exists(have));
        assert_eq!(
            find("sleep", DEFAULT_PATH),
            Ok(Some("/usr/bin/sleep".into()))
        );
        assert_eq!(find("sh", DEFAULT_PATH), Ok(Some("/bin/sh".into())));
        // The first PATH entry that has it; empty and relative entries skipped.
        assert_eq!(
            find("run", "::bin:/opt/app/bin:/bin"),
            Ok(Some("/opt/app/bin/run".into()))
        );
        assert_eq!(find("nope", DEFAULT_PATH), Ok(None));
        assert_eq!(find("./bin/run", ""), Ok(Some("/opt/app/bin/run".into())));
        assert_eq!(find("../x", ""), Ok(Some("/opt/x".into())));
        assert_eq!(find("/abs/prog", ""), Ok(Some("/abs/prog".into())));
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        \n\
        broken line\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n\
        nohome:x:1002:1002::relative:/bin/sh\n\
        bad:x:-5:0::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\n\
        app:x:1001:\n\
        wheel:x:10:root,app\n\
        audio:x:29:app\n\
        audio2:x:29:app\n\
        staff:x:50:\n";

    fn user(u: &str) -> Result<Credentials, UserError> {
        resolve_user(u, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn users_by_name_and_id() {
        let app = user("app").unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1001));
        // Supplementary groups: those listing the name, once each.
        assert_eq!(app.groups, [10, 29]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        // By uid: the same entry.
        assert_eq!(user("1000").unwrap(), app);
        // A uid /etc/passwd does not list: group 0, no home, no groups.
        let anon = user("4242").unwrap();
        assert_eq!((anon.uid, anon.gid, anon.groups.len()), (4242, 0, 0));
        assert_eq!(anon.home, None);
        // An explicit group: that group alone, by name or number.
        let g = user("app:staff").unwrap();
        assert_eq!((g.uid, g.gid, g.groups.len()), (1000, 50, 0));
        assert_eq!(user("app:7").unwrap().gid, 7);
        assert_eq!(user("4242:4243").unwrap().gid, 4243);
        assert_eq!(user("4242:wheel").unwrap().gid, 10);
        assert_eq!(user("1000:").unwrap(), app, "an empty group is none");
        assert_eq!(
            user("nohome").unwrap().home,
            None,
            "a relative home is none"
        );
        // No /etc/passwd at all: numeric IDs still work.
        let n = resolve_user("5:6", None, None).unwrap();
        assert_eq!((n.uid, n.gid), (5, 6));
    }

    #[test]
    fn names_that_are_not_there_are_errors_naming_them() {
        let e = user("nobody").unwrap_err();
        assert_eq!(
            e.to_string(),
            "user \"nobody\" is not in the image's /etc/passwd"
        );
        let e = user("app:nogroup").unwrap_err();
        assert_eq!(
            e.to_string(),
            "group \"nogroup\" is not in the image's /etc/group"
        );
        let e = resolve_user("app", None, None).unwrap_err();
        assert!(e.to_string().ends_with("(the image has none)"), "{e}");
        // A malformed line is no user.
        assert!(user("broken line").is_err());
        assert!(user("bad").is_err());
        for bad in ["4294967295", "99999999999", "1000:4294967295"] {
            assert!(matches!(user(bad), Err(UserError::Bad(_))), "{bad}");
        }
        // A sign is no number: a name that is not there.
        assert!(matches!(user("+5"), Err(UserError::NoUser { .. })));
    }
}
