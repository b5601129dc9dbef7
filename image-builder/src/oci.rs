//! OCI image layouts as bake inputs: `oci-layout` + `index.json` -> a manifest (by
//! `org.opencontainers.image.ref.name`, or the only one, or the linux/amd64 one; nested indexes
//! are followed) -> its config and layers, applied in order onto the staging tree with
//! whiteouts and opaque directories honoured.
//!
//! Every blob read is checked against its descriptor: the size first, then the sha256 of all
//! its bytes (index, manifest and config before they are parsed; a layer as it streams, before
//! its cache entry is committed). `oci-layout`, `index.json`, the index, manifest and config
//! are refused over the JSON limit ([`crate::limits`]) before they are read whole; a layer's
//! entries, bytes and compression ratio are held to the bake's limits as it unpacks. Layer
//! media types: tar, tar+gzip, tar+zstd (OCI and Docker names).
//!
//! The layer cache ([`LayerCache`]) keeps each layer unpacked, verbatim (whiteout markers
//! included), under `<cache>/sha256/<hex>/`, keyed by the digest of the compressed blob. An
//! entry is unpacked into a temporary directory in the cache and renamed into place only once
//! the blob's digest is verified, so an interrupted bake never leaves a bad entry. Applying a
//! cached layer hard-links its files into the staging tree (nothing ever writes through those
//! links) instead of unpacking it again.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use bootlace_contract::digest::{self, HashingReader};
use serde::Deserialize;

use crate::limits::{Budget, LimitError, Limits, RatioGuard};
use crate::ociconfig::{RunConfig, RunConfigError};
use crate::progress::Progress;
use crate::stage::{self, Confined, StageError, Writer};

/// Age after which a cache's temporary unpacking directory is taken as left behind.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// The annotation naming a manifest in an index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Why an OCI layout could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The layout is malformed (no `oci-layout`, bad JSON, no matching manifest, …).
    #[error("OCI layout {}: {message}", layout.display())]
    Layout {
        /// The layout directory.
        layout: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// No manifest of the index could be chosen.
    #[error("OCI layout {}", layout.display())]
    Pick {
        /// The layout directory.
        layout: PathBuf,
        /// Why.
        #[source]
        source: PickError,
    },
    /// A blob is missing or unreadable.
    #[error("OCI layout {}: blob {digest}", layout.display())]
    Blob {
        /// The layout directory.
        layout: PathBuf,
        /// The blob's digest.
        digest: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A blob's size or digest is not what its descriptor says.
    #[error("OCI layout {}: blob {digest}: {what} mismatch: the descriptor says {expected}, the blob has {actual}", layout.display())]
    Mismatch {
        /// The layout directory.
        layout: PathBuf,
        /// The blob's digest (as the descriptor gives it).
        digest: String,
        /// `size` or `digest`.
        what: &'static str,
        /// What the descriptor says.
        expected: String,
        /// What the blob has.
        actual: String,
    },
    /// Unpacking or applying a layer failed.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// A JSON document of the layout is over `--max-json-bytes`.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The image's config says to run it in a way that cannot be (a NUL in `Cmd`, …).
    #[error(transparent)]
    RunConfig(#[from] RunConfigError),
    /// The layer cache could not be used.
    #[error("layer cache {}", path.display())]
    Cache {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Annotations (the ref name).
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Platform (in an index).
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// A descriptor's platform.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`.
    pub os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// How a layer blob is compressed, from its media type.
fn layer_compression(media_type: &str) -> Option<bootlace_contract::compression::Compression> {
    use bootlace_contract::compression::Compression as C;
    let t = media_type.replace(".nondistributable", "");
    match t.as_str() {
        "application/vnd.oci.image.layer.v1.tar" => Some(C::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(C::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Some(C::Zstd),
        _ => None,
    }
}

/// Whether a directory is an OCI image layout (it has an `oci-layout` file).
pub fn is_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file()
}

/// An opened, checked layout and the manifest chosen in it.
#[derive(Debug)]
pub struct Image {
    layout: PathBuf,
    limits: Limits,
    /// The manifest's digest (`sha256:…`): the image's identity.
    pub manifest_digest: String,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// How the image says to run it: its config's Entrypoint, Cmd, Env, WorkingDir, User.
    pub run: RunConfig,
    /// The image as errors about its config name it (`OCI layout ./img (config sha256:…)`).
    pub name: String,
}

fn parse_digest(layout: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let bad = |m: String| OciError::Layout {
        layout: layout.to_owned(),
        message: m,
    };
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| bad(format!("digest {digest:?} has no algorithm")))?;
    if alg != "sha256" {
        return Err(bad(format!("digest {digest:?}: only sha256 is supported")));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad(format!(
            "digest {digest:?} is not 64 lower-case hex digits"
        )));
    }
    Ok(layout.join("blobs").join(alg).join(hex))
}

impl Image {
    /// Opens the layout at `layout` and picks a manifest: the one whose ref name is
    /// `reference` when given; otherwise the only one, or the only linux/amd64 one. Every JSON
    /// document read is refused over `limits.json_bytes` before it is read whole.
    pub fn open(
        layout: &Path,
        reference: Option<&str>,
        limits: &Limits,
    ) -> Result<Image, OciError> {
        let bad = |m: String| OciError::Layout {
            layout: layout.to_owned(),
            message: m,
        };
        let max = limits.json_bytes;
        let lf = read_json_file(layout, "oci-layout", max)?;
        let lf: LayoutFile =
            serde_json::from_slice(&lf).map_err(|e| bad(format!("oci-layout: {e}")))?;
        if !lf.version.starts_with("1.") {
            return Err(bad(format!(
                "imageLayoutVersion {:?} is not supported (1.x)",
                lf.version
            )));
        }
        let text = read_json_file(layout, "index.json", max)?;
        let mut index: Index =
            serde_json::from_slice(&text).map_err(|e| bad(format!("index.json: {e}")))?;
        let mut depth = 0;
        let chosen = loop {
            if index.schema_version != 2 {
                return Err(bad(format!(
                    "index schemaVersion {} (expected 2)",
                    index.schema_version
                )));
            }
            let d = pick(&index.manifests, reference).map_err(|source| OciError::Pick {
                layout: layout.to_owned(),
                source,
            })?;
            if INDEX_TYPES.contains(&d.media_type.as_str()) {
                depth += 1;
                if depth > 4 {
                    return Err(bad("indexes nested too deeply".to_owned()));
                }
                let bytes = read_json_blob(layout, &d, max)?;
                index = serde_json::from_slice(&bytes)
                    .map_err(|e| bad(format!("index {}: {e}", d.digest)))?;
                continue;
            }
            break d;
        };
        let bytes = read_json_blob(layout, &chosen, max)?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("manifest {}: {e}", chosen.digest)))?;
        if manifest.schema_version != 2 {
            return Err(bad(format!(
                "manifest {}: schemaVersion {} (expected 2)",
                chosen.digest, manifest.schema_version
            )));
        }
        // The config: checked like every blob, and read for how to run the image.
        let config = read_json_blob(layout, &manifest.config, max)?;
        let name = format!(
            "OCI layout {} (config {})",
            layout.display(),
            manifest.config.digest
        );
        let run = RunConfig::from_json(&config, &name)?;
        for l in &manifest.layers {
            if layer_compression(&l.media_type).is_none() {
                return Err(bad(format!(
                    "layer {}: media type {:?} is not supported (tar, tar+gzip, tar+zstd)",
                    l.digest, l.media_type
                )));
            }
            parse_digest(layout, &l.digest)?;
        }
        Ok(Image {
            layout: layout.to_owned(),
            limits: *limits,
            manifest_digest: chosen.digest,
            layers: manifest.layers,
            run,
            name,
        })
    }

    /// Applies every layer, bottom first, onto `stage`: from the cache when it has the layer,
    /// else unpacked (into the cache first when there is one). Every entry of every layer is
    /// charged to `budget` (a layer filled into the cache is also held to the limits alone, as
    /// it unpacks). Calls `report` once per layer with the digest and whether it came from the
    /// cache.
    pub fn apply(
        &self,
        stage: &Confined,
        cache: Option<&LayerCache>,
        progress: Option<&Progress>,
        budget: &Budget,
        report: &mut dyn FnMut(&str, bool),
    ) -> Result<(), OciError> {
        let writer = |origin: String| {
            let w = Writer::new(stage, origin, true).with_budget(budget);
            match progress {
                Some(p) => w.with_progress(p),
                None => w,
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let origin = format!("layer {}", layer.digest);
            match cache {
                None => {
                    let mut w = writer(origin);
                    if i == 0 {
                        w = w.bottom_layer();
                    }
                    self.unpack(layer, &mut w)?;
                    report(&layer.digest, false);
                }
                Some(cache) => {
                    let (dir, hit) = match cache.lookup(&layer.digest)? {
                        Some(dir) => (dir, true),
                        None => (cache.fill(self, layer)?, false),
                    };
                    let implicit = LayerCache::implicit(&dir)?;
                    let mut w = writer(origin);
                    stage::apply_dir(&mut w, &dir.join("tree"), &implicit)?;
                    report(&layer.digest, hit);
                }
            }
        }
        Ok(())
    }

    /// Streams a layer blob through its decompressor into `w`, checking size and digest.
    fn unpack(&self, layer: &Descriptor, w: &mut Writer<'_>) -> Result<(), OciError> {
        let path = parse_digest(&self.layout, &layer.digest)?;
        let blob_err = |source| OciError::Blob {
            layout: self.layout.clone(),
            digest: layer.digest.clone(),
            source,
        };
        let file = File::open(&path).map_err(blob_err)?;
        let len = file.metadata().map_err(blob_err)?.len();
        if len != layer.size {
            return Err(self.mismatch(layer, "size", layer.size.to_string(), len.to_string()));
        }
        let mut h = HashingReader::new(BufReader::with_capacity(256 * 1024, file));
        let compression = layer_compression(&layer.media_type)
            .unwrap_or(bootlace_contract::compression::Compression::None);
        let origin = format!("layer {}", layer.digest);
        let result = unpack_stream(w, &mut h, compression, &origin, self.limits.ratio);
        // Whatever happened, a digest mismatch is the clearer error: read the rest and check.
        let rest = io::copy(&mut h, &mut io::sink());
        let actual = h.finish().0.to_string();
        if rest.is_ok() && actual != layer.digest {
            return Err(self.mismatch(layer, "digest", layer.digest.clone(), actual));
        }
        result?;
        rest.map_err(blob_err)?;
        Ok(())
    }

    fn mismatch(&self, d: &Descriptor, what: &'static str, e: String, a: String) -> OciError {
        OciError::Mismatch {
            layout: self.layout.clone(),
            digest: d.digest.clone(),
            what,
            expected: e,
            actual: a,
        }
    }
}

/// Decompresses `r` as `compression` and unpacks the tar stream into `w`, then reads the
/// decompressor to its end (so the gzip CRC / zstd checksum is checked). A compressed stream
/// that unpacks to more than `max_ratio` times the bytes read of it (`0`: no limit; checked
/// past [`crate::limits::RATIO_FLOOR`]) is refused as it unpacks.
pub fn unpack_stream<R: Read>(
    w: &mut Writer<'_>,
    r: R,
    compression: bootlace_contract::compression::Compression,
    origin: &str,
    max_ratio: u64,
) -> Result<(), StageError> {
    use bootlace_contract::compression::Compression as C;
    let archive_err = |source| StageError::Archive {
        origin: origin.to_owned(),
        source,
    };
    let guard = RatioGuard::new(max_ratio);
    let mut reader: Box<dyn Read + '_> = match compression {
        C::None => Box::new(r),
        C::Gzip => Box::new(guard.unpacked(flate2::read::MultiGzDecoder::new(guard.compressed(r)))),
        C::Zstd => {
            Box::new(guard.unpacked(
                zstd::stream::read::Decoder::new(guard.compressed(r)).map_err(archive_err)?,
            ))
        }
    };
    let result = stage::unpack_tar(w, &mut reader)
        .and_then(|()| io::copy(&mut reader, &mut io::sink()).map_err(archive_err));
    drop(reader);
    match (result, guard.error(origin)) {
        // Whatever the archive reader made of it, the ratio stopped it.
        (Err(_), Some(e)) => Err(e.into()),
        (result, _) => result.map(drop),
    }
}

/// Why no manifest could be picked from an index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// No manifest has the ref name asked for.
    #[error("no manifest named {name:?} (names: {names})")]
    NoneNamed {
        /// The name asked for.
        name: String,
        /// The names there are.
        names: String,
    },
    /// Several have it, and not exactly one of them is for linux/amd64.
    #[error("several manifests named {0:?}, none for linux/amd64")]
    SeveralNamed(String),
    /// The index lists nothing.
    #[error("index.json lists no manifest")]
    Empty,
    /// Several manifests, no name asked for, not exactly one for linux/amd64.
    #[error(
        "index.json lists {count} manifests and none is the only linux/amd64 one: \
         name one with --oci-ref (names: {names})"
    )]
    Ambiguous {
        /// How many.
        count: usize,
        /// Their names.
        names: String,
    },
}

fn pick(manifests: &[Descriptor], reference: Option<&str>) -> Result<Descriptor, PickError> {
    let names = || {
        let n: Vec<&str> = manifests
            .iter()
            .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
            .collect();
        if n.is_empty() {
            "none".to_owned()
        } else {
            n.join(", ")
        }
    };
    if let Some(r) = reference {
        let found: Vec<&Descriptor> = manifests
            .iter()
            .filter(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(r))
            .collect();
        return match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(PickError::NoneNamed {
                name: r.to_owned(),
                names: names(),
            }),
            _ => prefer_amd64(&found).ok_or_else(|| PickError::SeveralNamed(r.to_owned())),
        };
    }
    match manifests {
        [] => Err(PickError::Empty),
        [one] => Ok(one.clone()),
        many => {
            let all: Vec<&Descriptor> = many.iter().collect();
            prefer_amd64(&all).ok_or_else(|| PickError::Ambiguous {
                count: many.len(),
                names: names(),
            })
        }
    }
}

fn prefer_amd64(ds: &[&Descriptor]) -> Option<Descriptor> {
    let amd64: Vec<&&Descriptor> = ds
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .collect();
    match amd64.as_slice() {
        [one] => Some((**one).clone()),
        _ => None,
    }
}

/// Reads `name` in the layout (`oci-layout`, `index.json`): refused over `max` bytes (`0`: no
/// limit) by its size first, and while reading (it may grow, or be no regular file), so no more
/// than `max + 1` bytes are ever read.
fn read_json_file(layout: &Path, name: &str, max: u64) -> Result<Vec<u8>, OciError> {
    let path = layout.join(name);
    let bad = |e: io::Error| OciError::Layout {
        layout: layout.to_owned(),
        message: format!("{name}: {e}"),
    };
    let over = |size| LimitError::Json {
        input: format!("OCI layout {}: {name}", layout.display()),
        size,
        max,
    };
    let file = File::open(&path).map_err(bad)?;
    let len = file.metadata().map_err(bad)?.len();
    if max != 0 && len > max {
        return Err(over(len).into());
    }
    let mut bytes = Vec::new();
    let cap = if max == 0 { u64::MAX } else { max + 1 };
    file.take(cap).read_to_end(&mut bytes).map_err(bad)?;
    if max != 0 && bytes.len() as u64 > max {
        return Err(over(bytes.len() as u64).into());
    }
    Ok(bytes)
}

/// Reads a small blob, checking its size (refused over `max`, `0`: no limit) and digest.
fn read_json_blob(layout: &Path, d: &Descriptor, max: u64) -> Result<Vec<u8>, OciError> {
    let path = parse_digest(layout, &d.digest)?;
    let blob_err = |source| OciError::Blob {
        layout: layout.to_owned(),
        digest: d.digest.clone(),
        source,
    };
    let mismatch = |what, expected: String, actual: String| OciError::Mismatch {
        layout: layout.to_owned(),
        digest: d.digest.clone(),
        what,
        expected,
        actual,
    };
    if max != 0 && d.size > max {
        return Err(LimitError::Json {
            input: format!("OCI layout {}: blob {}", layout.display(), d.digest),
            size: d.size,
            max,
        }
        .into());
    }
    let file = File::open(&path).map_err(blob_err)?;
    let mut bytes = Vec::new();
    // No more than the descriptor's size (itself within the limit) and one byte to tell.
    file.take(d.size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(blob_err)?;
    if bytes.len() as u64 != d.size {
        return Err(mismatch(
            "size",
            d.size.to_string(),
            bytes.len().to_string(),
        ));
    }
    let actual = digest::of_bytes(&bytes).to_string();
    if actual != d.digest {
        return Err(mismatch("digest", d.digest.clone(), actual));
    }
    Ok(bytes)
}

/// Unpacked layers by digest.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    /// The cache at `dir` (created, 0700, when missing).
    pub fn open(dir: &Path) -> Result<LayerCache, OciError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join("sha256"))
            .map_err(|source| OciError::Cache {
                path: dir.to_owned(),
                source,
            })?;
        // Unpackings an interrupted bake left behind (never read): removed once they are
        // old enough not to belong to a bake running now.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let stale = e.file_name().to_string_lossy().starts_with(".tmp-")
                    && e.metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > STALE_TMP);
                if stale {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(LayerCache {
            dir: dir.to_owned(),
        })
    }

    /// The default cache directory: `$XDG_CACHE_HOME/bootlace/layers`, else
    /// `~/.cache/bootlace/layers`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
            return Some(PathBuf::from(x).join("bootlace/layers"));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache/bootlace/layers"))
    }

    fn entry(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        Some(self.dir.join("sha256").join(hex))
    }

    /// The entry for a layer, when cached.
    pub fn lookup(&self, digest: &str) -> Result<Option<PathBuf>, OciError> {
        let Some(dir) = self.entry(digest) else {
            return Ok(None);
        };
        Ok(dir.join("tree").is_dir().then_some(dir))
    }

    fn implicit(entry: &Path) -> Result<HashSet<String>, OciError> {
        let path = entry.join("implicit.json");
        let text = std::fs::read(&path).map_err(|source| OciError::Cache {
            path: path.clone(),
            source,
        })?;
        let list: Vec<String> = serde_json::from_slice(&text).map_err(|e| OciError::Cache {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        Ok(list.into_iter().collect())
    }

    /// Unpacks a layer into the cache: into a temporary directory there, committed by rename
    /// once the blob's digest is verified. The layer alone is held to the image's limits while
    /// it unpacks (the bake's total is counted when it is applied).
    fn fill(&self, image: &Image, layer: &Descriptor) -> Result<PathBuf, OciError> {
        let cache_err = |path: &Path| {
            let path = path.to_owned();
            move |source| OciError::Cache { path, source }
        };
        let final_dir = self.entry(&layer.digest).ok_or_else(|| OciError::Layout {
            layout: image.layout.clone(),
            message: format!("digest {:?}: only sha256 is supported", layer.digest),
        })?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&self.dir)
            .map_err(cache_err(&self.dir))?;
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).map_err(cache_err(&tree))?;
        let root = Confined::open(&tree)?;
        let budget = Budget::new(image.limits);
        let mut w =
            Writer::new(&root, format!("layer {}", layer.digest), false).with_budget(&budget);
        image.unpack(layer, &mut w)?;
        let implicit = serde_json::to_vec(w.implicit_dirs()).unwrap_or_else(|_| b"[]".to_vec());
        let ipath = tmp.path().join("implicit.json");
        std::fs::write(&ipath, implicit).map_err(cache_err(&ipath))?;
        let tmp_path = tmp.keep();
        match std::fs::rename(&tmp_path, &final_dir) {
            Ok(()) => Ok(final_dir),
            Err(e) => {
                // Another bake committed the same layer meanwhile: use theirs.
                let _ = std::fs::remove_dir_all(&tmp_path);
                if final_dir.join("tree").is_dir() {
                    Ok(final_dir)
                } else {
                    Err(cache_err(&final_dir)(e))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: Option<&str>, arch: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            annotations: name
                .map(|n| [(REF_NAME.to_owned(), n.to_owned())].into())
                .unwrap_or_default(),
            platform: arch.map(|a| Platform {
                architecture: a.into(),
                os: "linux".into(),
            }),
        }
    }

    #[test]
    fn picks_a_manifest() {
        let one = [desc(Some("a"), None)];
        assert!(pick(&one, None).is_ok());
        assert!(pick(&one, Some("a")).is_ok());
        let err = pick(&one, Some("b")).unwrap_err().to_string();
        assert!(err.contains("names: a"), "{err}");
        let two = [
            desc(Some("x"), Some("arm64")),
            desc(Some("y"), Some("amd64")),
        ];
        let d = pick(&two, None).expect("amd64");
        assert_eq!(d.annotations.get(REF_NAME).map(String::as_str), Some("y"));
        let two = [desc(Some("x"), None), desc(Some("y"), None)];
        assert!(pick(&two, None)
            .unwrap_err()
            .to_string()
            .contains("--oci-ref"));
        assert!(pick(&[], None).is_err());
    }

    #[test]
    fn media_types() {
        use bootlace_contract::compression::Compression as C;
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(C::Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"),
            Some(C::Zstd)
        );
        assert_eq!(layer_compression("application/json"), None);
    }
}
