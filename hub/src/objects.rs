//! TEMPORARY stand-in for the lead's `objects.rs` (same API, local backend
//! only), so artifacts.rs can be written before it lands on main; replaced
//! by main's file at the merge.

use std::path::Path;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;

/// Where artifacts and compacted logs live.
#[derive(Clone, Debug)]
pub(crate) struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    dir: String,
}

/// Why the object store cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ObjectsError {
    /// A store operation failed.
    #[error("object store: cannot {action} {path}: {source}")]
    Store {
        /// What was done.
        action: &'static str,
        /// Where.
        path: String,
        /// Why.
        source: object_store::Error,
    },
}

impl ObjectsError {
    /// A `map_err` helper.
    pub(crate) fn from_store(
        action: &'static str,
        path: &object_store::path::Path,
    ) -> impl FnOnce(object_store::Error) -> ObjectsError {
        let path = path.to_string();
        move |source| ObjectsError::Store {
            action,
            path,
            source,
        }
    }
}

impl Objects {
    /// A local backend rooted at `dir`.
    pub(crate) fn local(dir: &Path) -> Result<Objects, ObjectsError> {
        std::fs::create_dir_all(dir).map_err(|e| ObjectsError::Store {
            action: "create",
            path: dir.display().to_string(),
            source: object_store::Error::Generic {
                store: "local",
                source: Box::new(e),
            },
        })?;
        let store =
            LocalFileSystem::new_with_prefix(dir).map_err(|source| ObjectsError::Store {
                action: "open",
                path: dir.display().to_string(),
                source,
            })?;
        Ok(Objects {
            store: Arc::new(store),
            prefix: "trunkfarm".into(),
            dir: dir.display().to_string(),
        })
    }

    /// True for S3.
    pub(crate) fn is_remote(&self) -> bool {
        false
    }

    /// The path of `rel` under the prefix.
    pub(crate) fn path(&self, rel: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{}/{rel}", self.prefix))
    }

    /// The store.
    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// A GET URL for `rel` (None on local).
    pub(crate) async fn presign_get(
        &self,
        _rel: &str,
    ) -> Result<Option<(reqwest::Url, u64)>, ObjectsError> {
        Ok(None)
    }

    /// For logs.
    pub(crate) fn describe(&self) -> String {
        self.dir.clone()
    }
}
