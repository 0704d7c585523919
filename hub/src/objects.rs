//! STAND-IN until the lead's object-store foundation is merged from main
//! (same API subset: local backend only). Replaced whole by main's file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

/// Why the object store cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ObjectsError {
    /// The configuration cannot make a client.
    #[error("storage: {0}")]
    Setup(String),
    /// A request failed.
    #[error("storage: cannot {action} {path} in {store}: {source}{hint}")]
    Store {
        action: &'static str,
        path: String,
        store: String,
        hint: String,
        #[source]
        source: Box<object_store::Error>,
    },
}

/// The handle on the object store.
#[derive(Clone, Debug)]
pub(crate) struct Objects {
    store: Arc<dyn ObjectStore>,
    dir: PathBuf,
}

impl Objects {
    pub(crate) fn local(dir: &Path) -> Result<Objects, ObjectsError> {
        std::fs::create_dir_all(dir).map_err(|e| ObjectsError::Setup(e.to_string()))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| ObjectsError::Setup(e.to_string()))?
            .with_automatic_cleanup(true);
        Ok(Objects {
            store: Arc::new(store),
            dir: dir.to_path_buf(),
        })
    }

    pub(crate) fn path(&self, rel: &str) -> object_store::path::Path {
        object_store::path::Path::from(rel.trim_start_matches('/'))
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub(crate) async fn sync(&self, rel: &str) -> Result<(), ObjectsError> {
        let file = self.dir.join(rel);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            if let Some(dir) = file.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| ObjectsError::Setup(e.to_string()))?
        .map_err(|e| ObjectsError::Setup(e.to_string()))
    }

    pub(crate) fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    pub(crate) fn error(
        &self,
        action: &'static str,
        path: &object_store::path::Path,
    ) -> impl FnOnce(object_store::Error) -> ObjectsError + use<> {
        let path = path.to_string();
        let store = self.describe();
        move |source| ObjectsError::Store {
            action,
            hint: String::new(),
            path,
            store,
            source: Box::new(source),
        }
    }
}
