//! Loading kernel modules with their dependencies from `/lib/modules/$(uname -r)`: the index
//! is read once per boot and shared by every step that needs modules.

use std::io;
use std::path::{Path, PathBuf};

use crate::sys;
use bootlace_contract::kmod::{KmodError, ModuleIndex, Resolved};

/// A module that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModLoadError {
    /// The index could not be read, or a module is unknown.
    #[error("modules")]
    Index(#[source] KmodError),
    /// `finit_module` or opening the file failed.
    #[error("modules: load {name} from {}", path.display())]
    Load {
        /// The module.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Loads modules, reading the index on first use.
#[derive(Debug, Default)]
pub struct ModuleLoader {
    index: Option<ModuleIndex>,
}

impl ModuleLoader {
    /// A loader for the running kernel.
    pub fn new() -> Self {
        ModuleLoader::default()
    }

    fn index(&mut self) -> Result<&ModuleIndex, ModLoadError> {
        if self.index.is_none() {
            let release = rustix::system::uname()
                .release()
                .to_string_lossy()
                .into_owned();
            let dir = Path::new("/lib/modules").join(release);
            self.index = Some(ModuleIndex::read(&dir).map_err(ModLoadError::Index)?);
        }
        self.index.as_ref().ok_or_else(|| {
            ModLoadError::Index(KmodError::NotFound {
                name: String::new(),
                dir: PathBuf::from("/lib/modules"),
            })
        })
    }

    /// Loads the named modules and their dependencies; returns the ones it loaded (modules
    /// already loaded or built in are skipped).
    pub fn load<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<String>, ModLoadError> {
        let names: Vec<&str> = names.into_iter().collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let index = self.index()?;
        let dir = index.dir().to_owned();
        let plan = index.resolve(names).map_err(ModLoadError::Index)?;
        let mut loaded = Vec::new();
        for step in plan {
            let module = match step {
                Resolved::Builtin(name) => {
                    log::debug!("module {name} is built in");
                    continue;
                }
                Resolved::Load(m) => m,
            };
            if Path::new("/sys/module").join(&module.name).exists() {
                log::debug!("module {} already loaded", module.name);
                continue;
            }
            let path = dir.join(&module.path);
            let err = |source| ModLoadError::Load {
                name: module.name.clone(),
                path: path.clone(),
                source,
            };
            let file = std::fs::File::open(&path).map_err(err)?;
            match sys::finit_module(&file, module.is_compressed()) {
                Ok(()) => loaded.push(module.name),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(loaded)
    }

    /// Loads what it can of the named modules, logging (not failing on) the rest: for the
    /// drivers a bootstrap source may need, where a missing one shows up as "not found" with
    /// the list of what was probed.
    pub fn load_best_effort(&mut self, names: &[&str]) -> Vec<String> {
        let mut loaded = Vec::new();
        for name in names {
            match self.load([*name]) {
                Ok(l) => loaded.extend(l),
                Err(e) => log::warn!("{}", bootlace_contract::chain(&e)),
            }
        }
        loaded
    }
}
