//! Validated value types shared by the init's config, the bootstrap manifest and the image
//! builder. Each checks its invariant in `try_from`, which serde calls while parsing, so an
//! invalid value never exists.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest module name accepted (the kernel's MODULE_NAME_LEN is 56).
const MAX_MODULE_NAME: usize = 56;
/// Longest single value (argv word, env value) accepted, in bytes.
const MAX_VALUE_BYTES: usize = 4096;

/// A value that does not fit its type: which kind of value, the value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidValue {
    /// The kind of value (`module name`, `path`, `host address`, …).
    pub what: &'static str,
    /// The value as given, shortened to 80 characters.
    pub value: String,
    /// Why it does not fit (`must be 1 to 56 bytes`).
    pub why: Cow<'static, str>,
}

impl InvalidValue {
    /// `what` `value` does not fit because `why`.
    pub fn new(what: &'static str, value: &str, why: impl Into<Cow<'static, str>>) -> Self {
        let mut end = value.len().min(80);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        let mut shown = value.get(..end).unwrap_or_default().to_owned();
        if end < value.len() {
            shown.push('…');
        }
        InvalidValue {
            what,
            value: shown,
            why: why.into(),
        }
    }
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{} {}", self.what, self.why)
        } else {
            write!(f, "{} {:?} {}", self.what, self.value, self.why)
        }
    }
}

/// How the init hands the machine over once booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandoffMode {
    /// Replace PID 1 with the real init (`execve`).
    #[default]
    Exec,
    /// Run the command as a child, stay PID 1, and power off when it exits.
    Supervise,
    /// Run no command: once the configuration is applied, READY reported and the bootstrap
    /// cleaned up, sync and power off with status 0 (`bootlace-image capture` boots a guest
    /// so, to bake what the configuration left on its root). A manifest cannot change it.
    Poweroff,
}

impl FromStr for HandoffMode {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        match s {
            "exec" => Ok(HandoffMode::Exec),
            "supervise" => Ok(HandoffMode::Supervise),
            "poweroff" => Ok(HandoffMode::Poweroff),
            _ => Err(InvalidValue::new(
                "hand-off mode",
                s,
                "is not one of exec, supervise, poweroff",
            )),
        }
    }
}

impl HandoffMode {
    /// The mode's name in config.
    pub fn as_str(self) -> &'static str {
        match self {
            HandoffMode::Exec => "exec",
            HandoffMode::Supervise => "supervise",
            HandoffMode::Poweroff => "poweroff",
        }
    }
}

/// The image an init was baked into, `name@version` as the image's metadata names it:
/// 1 to 200 bytes of letters, digits and `._+-`, one `@` between a non-empty name and version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef(String);

/// Longest [`ImageRef`].
pub const MAX_IMAGE_REF: usize = 200;

impl ImageRef {
    /// `name@version`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `name` and `version` joined, checked.
    pub fn new(name: &str, version: &str) -> Result<ImageRef, InvalidValue> {
        ImageRef::try_from(format!("{name}@{version}"))
    }
}

impl TryFrom<String> for ImageRef {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
        };
        let ok = s.len() <= MAX_IMAGE_REF
            && s.split_once('@')
                .is_some_and(|(n, v)| part_ok(n) && part_ok(v));
        if ok {
            Ok(ImageRef(s))
        } else {
            Err(InvalidValue::new(
                "image",
                &s,
                format!(
                    "must be name@version, at most {MAX_IMAGE_REF} bytes of letters, digits \
                     and ._+-"
                ),
            ))
        }
    }
}

impl From<ImageRef> for String {
    fn from(i: ImageRef) -> String {
        i.0
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A kernel module name: `[A-Za-z0-9_-]{1,56}`; `-` and `_` are the same module.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModuleName(String);

impl ModuleName {
    /// The canonical name (`-` replaced by `_`), as `/sys/module` spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModuleName {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        if s.is_empty() || s.len() > MAX_MODULE_NAME {
            return Err(InvalidValue::new(
                "module name",
                &s,
                format!("must be 1 to {MAX_MODULE_NAME} bytes"),
            ));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(InvalidValue::new(
                "module name",
                &s,
                "may hold only letters, digits, '_' and '-'",
            ));
        }
        Ok(ModuleName(s.replace('-', "_")))
    }
}

impl From<ModuleName> for String {
    fn from(m: ModuleName) -> String {
        m.0
    }
}

impl fmt::Display for ModuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EnvName(String);

impl EnvName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EnvName {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        let mut bytes = s.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') || s.len() > 256 {
            return Err(InvalidValue::new(
                "environment variable name",
                &s,
                "must match [A-Za-z_][A-Za-z0-9_]* (at most 256 bytes)",
            ));
        }
        Ok(EnvName(s))
    }
}

impl From<EnvName> for String {
    fn from(n: EnvName) -> String {
        n.0
    }
}

/// A string that can be passed to `execve`: no NUL byte, at most 4096 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExecString(String);

impl ExecString {
    /// The empty string.
    pub fn empty() -> ExecString {
        ExecString(String::new())
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ExecString {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        if s.contains('\0') {
            return Err(InvalidValue::new("value", &s, "contains a NUL byte"));
        }
        if s.len() > MAX_VALUE_BYTES {
            return Err(InvalidValue::new(
                "value",
                &s,
                format!("is {} bytes, over {MAX_VALUE_BYTES}", s.len()),
            ));
        }
        Ok(ExecString(s))
    }
}

impl FromStr for ExecString {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        ExecString::try_from(s.to_owned())
    }
}

impl FromStr for ModuleName {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        ModuleName::try_from(s.to_owned())
    }
}

impl From<ExecString> for String {
    fn from(s: ExecString) -> String {
        s.0
    }
}

/// The longest filesystem label bootlace looks for, in bytes: the longest any filesystem it
/// reads stores (an ISO 9660 volume id; ext4 keeps 16, erofs 15, FAT 11).
pub const MAX_LABEL_BYTES: usize = 32;

/// The longest 9p mount tag, in bytes (QEMU's limit).
pub const MAX_TAG_BYTES: usize = 31;

fn check_short_name(what: &'static str, s: &str, max: usize) -> Result<(), InvalidValue> {
    if s.is_empty() || s.len() > max {
        return Err(InvalidValue::new(
            what,
            s,
            format!("must be 1 to {max} bytes"),
        ));
    }
    if s.chars().any(|c| c.is_control() || c == '/') {
        return Err(InvalidValue::new(
            what,
            s,
            "may not hold control characters or '/'",
        ));
    }
    Ok(())
}

/// A filesystem label to look for: 1 to [`MAX_LABEL_BYTES`] bytes, no control character, no
/// `/`. A longer one could never match, so it is refused instead of waited for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Label(String);

impl Label {
    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A label known to be valid (crate-internal defaults).
    pub(crate) fn trusted(s: &'static str) -> Label {
        Label(s.to_owned())
    }
}

impl TryFrom<String> for Label {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        check_short_name("filesystem label", &s, MAX_LABEL_BYTES)?;
        Ok(Label(s))
    }
}

impl FromStr for Label {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        Label::try_from(s.to_owned())
    }
}

impl From<Label> for String {
    fn from(l: Label) -> String {
        l.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A virtio 9p mount tag: 1 to [`MAX_TAG_BYTES`] bytes, no control character, no `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MountTag(String);

impl MountTag {
    /// The tag.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A tag known to be valid (crate-internal defaults).
    pub(crate) fn trusted(s: &'static str) -> MountTag {
        MountTag(s.to_owned())
    }
}

impl TryFrom<String> for MountTag {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        check_short_name("9p mount tag", &s, MAX_TAG_BYTES)?;
        Ok(MountTag(s))
    }
}

impl FromStr for MountTag {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        MountTag::try_from(s.to_owned())
    }
}

impl From<MountTag> for String {
    fn from(t: MountTag) -> String {
        t.0
    }
}

impl fmt::Display for MountTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The argv of the hand-off command: at least one word, the first an absolute path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Command(Vec<ExecString>);

impl Command {
    /// The program's absolute path.
    pub fn program(&self) -> &Path {
        Path::new(self.0.first().map_or("/", ExecString::as_str))
    }

    /// All words, program first.
    pub fn argv(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(ExecString::as_str)
    }

    /// The words after the program.
    pub fn args(&self) -> impl Iterator<Item = &str> {
        self.argv().skip(1)
    }
}

impl TryFrom<Vec<String>> for Command {
    type Error = InvalidValue;
    fn try_from(words: Vec<String>) -> Result<Self, InvalidValue> {
        if words.len() > 256 {
            return Err(InvalidValue::new(
                "command",
                &words.join(" "),
                format!("has {} words, over 256", words.len()),
            ));
        }
        let words = words
            .into_iter()
            .map(ExecString::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        match words.first() {
            None => Err(InvalidValue::new("command", "", "is empty")),
            Some(p) if !p.as_str().starts_with('/') => Err(InvalidValue::new(
                "command",
                p.as_str(),
                "must be an absolute path",
            )),
            Some(_) => Ok(Command(words)),
        }
    }
}

impl From<Command> for Vec<String> {
    fn from(c: Command) -> Vec<String> {
        c.0.into_iter().map(String::from).collect()
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<&str> = self.argv().collect();
        write!(f, "{}", words.join(" "))
    }
}

impl Command {
    /// `["/sbin/init"]`.
    pub fn default_init() -> Command {
        Command(vec![ExecString("/sbin/init".to_owned())])
    }

    /// `["/sbin/bootlace-init"]`: where the image builder installs the init.
    pub fn default_bootlace() -> Command {
        Command(vec![ExecString("/sbin/bootlace-init".to_owned())])
    }
}

/// Longest path accepted, in bytes (Linux PATH_MAX, including the NUL).
pub const PATH_MAX: usize = 4095;

/// The working directory of the hand-off command: an absolute, normalised path (no `.` or `..`
/// component, no empty one, no NUL, at most PATH_MAX bytes); `/` itself is allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkDir(String);

impl WorkDir {
    /// The path, with its leading `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path as a `Path`.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl TryFrom<String> for WorkDir {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        if !s.starts_with('/') {
            return Err(InvalidValue::new(
                "working directory",
                &s,
                "must be absolute",
            ));
        }
        if s != "/" {
            check_components(&s, "working directory")?;
        }
        Ok(WorkDir(s))
    }
}

impl FromStr for WorkDir {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        WorkDir::try_from(s.to_owned())
    }
}

impl From<WorkDir> for String {
    fn from(w: WorkDir) -> String {
        w.0
    }
}

impl fmt::Display for WorkDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user or group ID: 0 to 4294967294 (`-1`, 4294967295, means "no change" to setuid(2) and
/// is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct UnixId(u32);

impl UnixId {
    /// The ID.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Root's ID, 0.
    pub const ROOT: UnixId = UnixId(0);
}

impl TryFrom<u32> for UnixId {
    type Error = InvalidValue;
    fn try_from(v: u32) -> Result<Self, InvalidValue> {
        if v == u32::MAX {
            return Err(InvalidValue::new(
                "user or group ID",
                &v.to_string(),
                "is -1, which means no ID (at most 4294967294)",
            ));
        }
        Ok(UnixId(v))
    }
}

impl From<UnixId> for u32 {
    fn from(i: UnixId) -> u32 {
        i.0
    }
}

impl fmt::Display for UnixId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Top-level directories a manifest may never write to or mount over: kernel interfaces and
/// the bootstrap itself.
pub const FORBIDDEN_ROOTS: &[&str] = &["/proc", "/sys", "/dev", "/.bootstrap"];

fn check_components(s: &str, what: &'static str) -> Result<(), InvalidValue> {
    let bad = |why: Cow<'static, str>| Err(InvalidValue::new(what, s, why));
    if s.contains('\0') {
        return bad("contains a NUL byte".into());
    }
    if s.len() > PATH_MAX {
        return bad(format!("is {} bytes, over {PATH_MAX}", s.len()).into());
    }
    // One leading `/` (for a target path); any other is an empty component.
    for comp in s.strip_prefix('/').unwrap_or(s).split('/') {
        match comp {
            "" => return bad("has an empty component (// or a trailing /)".into()),
            "." | ".." => return bad(format!("has a {comp:?} component").into()),
            c if c.len() > 255 => return bad("has a component over 255 bytes".into()),
            _ => {}
        }
    }
    Ok(())
}

/// An absolute, normalised path in the guest's root that a manifest may change: no `.` or `..`
/// components, no empty component, no NUL, at most PATH_MAX bytes, not `/` itself and not under
/// [`FORBIDDEN_ROOTS`]. Where it leads is still resolved inside the root when it is used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TargetPath(String);

impl TargetPath {
    /// A path known to be valid at compile time (crate-internal defaults).
    pub(crate) fn trusted(s: &'static str) -> TargetPath {
        TargetPath(s.to_owned())
    }

    /// The path, with its leading `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path relative to the root (no leading `/`).
    pub fn relative(&self) -> &str {
        self.0.trim_start_matches('/')
    }

    /// The path as a `Path`.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// Whether `self` is `other` or lies below it.
    pub fn is_within(&self, other: &TargetPath) -> bool {
        self.0 == other.0
            || self
                .0
                .strip_prefix(&other.0)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl TryFrom<String> for TargetPath {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        if !s.starts_with('/') {
            return Err(InvalidValue::new("path", &s, "must be absolute"));
        }
        if s == "/" {
            return Err(InvalidValue::new(
                "path",
                &s,
                "(the root itself) cannot be a target",
            ));
        }
        check_components(&s, "path")?;
        for root in FORBIDDEN_ROOTS {
            if s == *root || s.strip_prefix(root).is_some_and(|r| r.starts_with('/')) {
                return Err(InvalidValue::new(
                    "path",
                    &s,
                    format!("is under {root}, which a manifest may not change"),
                ));
            }
        }
        Ok(TargetPath(s))
    }
}

impl From<TargetPath> for String {
    fn from(p: TargetPath) -> String {
        p.0
    }
}

impl fmt::Display for TargetPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A normalised relative path inside a bundle (`files/app.conf`): no leading `/`, no `.` or
/// `..` components, no NUL. Resolved inside the bundle root when it is used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BundlePath(String);

impl BundlePath {
    /// The path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BundlePath {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        if s.starts_with('/') {
            return Err(InvalidValue::new(
                "bundle path",
                &s,
                "must be relative to the bundle root",
            ));
        }
        if s.is_empty() {
            return Err(InvalidValue::new("bundle path", "", "is empty"));
        }
        check_components(&s, "bundle path")?;
        Ok(BundlePath(s))
    }
}

impl From<BundlePath> for String {
    fn from(p: BundlePath) -> String {
        p.0
    }
}

/// Permission bits, at most `0o7777` (TOML: `mode = 0o644`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Mode(u32);

impl Mode {
    /// A mode known to be valid.
    pub const fn new_const(bits: u16) -> Mode {
        Mode((bits & 0o7777) as u32)
    }

    /// The bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Mode {
    type Error = InvalidValue;
    fn try_from(v: u32) -> Result<Self, InvalidValue> {
        if v > 0o7777 {
            return Err(InvalidValue::new(
                "mode",
                &format!("{v:#o}"),
                "is over 0o7777",
            ));
        }
        Ok(Mode(v))
    }
}

impl From<Mode> for u32 {
    fn from(m: Mode) -> u32 {
        m.0
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// Why a versioned TOML document was refused.
#[derive(Debug)]
pub enum VersionedError {
    /// It declares a version not in the supported list (0 when it declares none).
    Version(i64),
    /// It is not valid for the schema.
    Toml(toml::de::Error),
}

/// Parses a versioned TOML document with a single parse when it is valid: the typed parse
/// comes first and its `version` is checked; only when that parse fails is the version probed,
/// so that an unsupported version is reported as such and not as whatever key it lacks.
pub fn parse_versioned<T: serde::de::DeserializeOwned>(
    text: &str,
    supported: &[i64],
    version_of: impl Fn(&T) -> i64,
) -> Result<T, VersionedError> {
    match toml::from_str::<T>(text) {
        Ok(v) if supported.contains(&version_of(&v)) => Ok(v),
        Ok(v) => Err(VersionedError::Version(version_of(&v))),
        Err(e) => match toml_version(text) {
            Ok(found) if !supported.contains(&found) => Err(VersionedError::Version(found)),
            _ => Err(VersionedError::Toml(e)),
        },
    }
}

/// The `version` a TOML document declares (0 when it has none or it is not an integer),
/// read before the document is checked against a schema, so the right schema can be chosen and
/// an unsupported version named as such.
pub fn toml_version(text: &str) -> Result<i64, toml::de::Error> {
    #[derive(Deserialize)]
    struct VersionProbe {
        version: Option<toml::Value>,
    }
    let probe: VersionProbe = toml::from_str(text)?;
    Ok(match probe.version {
        Some(toml::Value::Integer(v)) => v,
        _ => 0,
    })
}

/// Reads at most `max + 1` bytes of UTF-8 (one more than allowed, so the caller can tell a
/// file over the limit without reading all of it).
pub fn read_capped(r: impl std::io::Read, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    r.take(max.saturating_add(1)).read_to_string(&mut text)?;
    Ok(text)
}

/// A TOML error on one line, for the console: `line 3, column 8: unknown field `bogus`, …`.
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        // The parser's depth limit on dotted keys carries no position: say what it means.
        None if message == "recursion limit" => {
            "keys or values nested too deeply (recursion limit)".to_owned()
        }
        None => message,
    }
}

#[cfg(test)]
mod image_ref_tests {
    use super::*;

    #[test]
    fn image_refs_are_name_at_version() {
        assert_eq!(ImageRef::new("web", "1.0").expect("ok").as_str(), "web@1.0");
        for bad in ["web", "@1", "web@", "a@b@c", "we b@1", "w\u{1b}@1"] {
            assert!(ImageRef::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        assert!(ImageRef::try_from(format!("{}@1", "x".repeat(MAX_IMAGE_REF))).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_paths() {
        for ok in [
            "/etc/app.conf",
            "/var",
            "/a b/c",
            "/run/x",
            "/devices",
            "/.bootstrapped",
        ] {
            TargetPath::try_from(ok.to_owned()).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let long = format!("/{}", "a/".repeat(2100));
        let cases: &[(&str, &str)] = &[
            ("", "absolute"),
            ("etc/x", "absolute"),
            ("/", "root itself"),
            ("/etc/../x", "\"..\" component"),
            ("/etc/./x", "\".\" component"),
            ("/etc//x", "empty component"),
            ("//etc/x", "empty component"),
            ("//proc/x", "empty component"),
            ("/etc/", "empty component"),
            ("/etc/\0x", "NUL"),
            ("/proc/sys/kernel/x", "under /proc"),
            ("/sys", "under /sys"),
            ("/dev/sda", "under /dev"),
            ("/.bootstrap/bootlace.toml", "under /.bootstrap"),
            (&long, "over 4095"),
        ];
        for (bad, want) in cases {
            let err = TargetPath::try_from((*bad).to_owned())
                .expect_err(bad)
                .to_string();
            assert!(err.contains(want), "{bad:?}: {err} lacks {want}");
        }
        let a = TargetPath::try_from("/var/lib".to_owned()).expect("ok");
        let b = TargetPath::try_from("/var/lib/x".to_owned()).expect("ok");
        let c = TargetPath::try_from("/var/libx".to_owned()).expect("ok");
        assert!(b.is_within(&a) && a.is_within(&a) && !c.is_within(&a) && !a.is_within(&b));
    }

    #[test]
    fn bundle_paths_and_modes() {
        BundlePath::try_from("files/a.conf".to_owned()).expect("ok");
        for bad in ["", "/abs", "../x", "a/../../x", "a//b", "a/\0"] {
            assert!(BundlePath::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
        assert!(Mode::try_from(0o4755).is_ok());
        assert!(Mode::try_from(0o10000).is_err());
        assert_eq!(Mode::new_const(0o644).to_string(), "0644");
    }
}
