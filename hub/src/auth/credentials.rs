//! Enrollment tokens and agent credentials, stored hashed in the `auth` tree.
//!
//! A token is what an operator hands a volunteer (inside the enrollment
//! string); enrolling exchanges it for the agent's own long-lived credential.
//! Each token use and each enrollment is one sled transaction, so a token with
//! `uses = 1` can never enroll two agents, even with concurrent attempts.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::secret;
use crate::store::{Store, StoreError, now_ms, trees};

/// Why an authentication or credential operation was refused. The messages
/// are shown to volunteers and operators as they are.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Malformed token or credential.
    #[error(
        "the enrollment token is malformed: copy the whole enrollment string printed by `trunkfarm token create`"
    )]
    TokenMalformed,
    /// Unknown token, or wrong secret (deliberately not told apart).
    #[error(
        "enrollment token {0} is not valid for this hub (wrong hub, a mistyped string, or the hub's data was reset): ask the hub's operator for a new enrollment string"
    )]
    TokenInvalid(String),
    /// The token's time is up.
    #[error(
        "enrollment token {id} expired {ago} ago: ask the hub's operator for a new one (`trunkfarm token create`)"
    )]
    TokenExpired {
        /// Token id.
        id: String,
        /// How long ago, human-readable.
        ago: String,
    },
    /// All uses consumed.
    #[error(
        "enrollment token {id} has already been used {uses} time(s), its limit: ask the hub's operator for a new one"
    )]
    TokenUsedUp {
        /// Token id.
        id: String,
        /// Its limit.
        uses: u32,
    },
    /// Revoked by the operator.
    #[error(
        "enrollment token {0} was revoked by the hub's operator: ask them for a new enrollment string"
    )]
    TokenRevoked(String),
    /// No such token (for revoke).
    #[error("no enrollment token {0}: see `trunkfarm token list`")]
    NoSuchToken(String),
    /// Unknown agent or wrong secret.
    #[error(
        "this agent's credential is not valid for this hub (wrong hub, or the hub's data was reset): enroll again with a new enrollment string"
    )]
    AgentInvalid,
    /// The agent was revoked.
    #[error(
        "agent {0} was revoked by the hub's operator and may not connect again: enroll again with a new enrollment string if the operator agrees"
    )]
    AgentRevoked(String),
    /// No such agent (for revoke/drain).
    #[error("no agent {0}: see `trunkfarm agent list`")]
    NoSuchAgent(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A stored enrollment token. The secret itself is never stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// `tok_…`
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: String,
    /// Labels granted to agents enrolled with it.
    pub labels: Vec<String>,
    /// When it was created.
    pub created_at_ms: u64,
    /// When it stops working.
    pub expires_at_ms: u64,
    /// How many enrollments it allows in all.
    pub uses_total: u32,
    /// How many remain.
    pub uses_left: u32,
    /// Revoked by the operator.
    pub revoked: bool,
    /// Free text from the operator.
    #[serde(default)]
    pub note: String,
}

/// A stored agent identity.
#[derive(Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    /// `ag_…`
    pub id: String,
    /// The name the volunteer chose.
    pub name: String,
    /// SHA-256 of the agent's secret.
    pub hash: String,
    /// Labels granted by its token.
    pub labels: Vec<String>,
    /// When it enrolled.
    pub enrolled_at_ms: u64,
    /// The token it enrolled with.
    pub token_id: String,
    /// Revoked by the operator: refused from then on.
    pub revoked: bool,
}

impl std::fmt::Debug for AgentRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// The owner of the `auth` tree.
#[derive(Clone)]
pub struct Credentials {
    store: Store,
    tree: sled::Tree,
}

fn token_key(id: &str) -> Vec<u8> {
    format!("t/{id}").into_bytes()
}

fn agent_key(id: &str) -> Vec<u8> {
    format!("a/{id}").into_bytes()
}

/// Aborts a sled transaction with an [`AuthError`].
fn abort<T>(e: AuthError) -> Result<T, ConflictableTransactionError<AuthError>> {
    Err(ConflictableTransactionError::Abort(e))
}

impl Credentials {
    /// Opens the `auth` tree.
    pub fn open(store: &Store) -> Result<Credentials, StoreError> {
        Ok(Credentials {
            store: store.clone(),
            tree: store.tree(trees::AUTH)?,
        })
    }

    /// Creates a token; returns its record and the full `<id>.<secret>` token.
    pub async fn create_token(
        &self,
        labels: Vec<String>,
        ttl: Duration,
        uses: u32,
        note: String,
    ) -> Result<(TokenRecord, String), AuthError> {
        let id = secret::new_id("tok");
        let secret = secret::new_secret();
        let now = now_ms();
        let uses = uses.max(1);
        let rec = TokenRecord {
            id: id.clone(),
            hash: secret::hash(&secret),
            labels,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(ttl.as_millis() as u64),
            uses_total: uses,
            uses_left: uses,
            revoked: false,
            note,
        };
        self.put(&token_key(&id), &rec)?;
        self.store.commit().await?;
        Ok((rec, format!("{id}.{secret}")))
    }

    /// Every token, newest first.
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, AuthError> {
        let mut out: Vec<TokenRecord> = self.scan(b"t/")?;
        out.sort_by_key(|t| std::cmp::Reverse(t.created_at_ms));
        Ok(out)
    }

    /// Revokes a token: it enrolls nobody from now on.
    pub async fn revoke_token(&self, id: &str) -> Result<(), AuthError> {
        let key = token_key(id);
        let mut rec: TokenRecord = self
            .get(&key)?
            .ok_or_else(|| AuthError::NoSuchToken(id.to_string()))?;
        rec.revoked = true;
        self.put(&key, &rec)?;
        self.store.commit().await?;
        Ok(())
    }

    /// Exchanges a token (`<id>.<secret>`) for a new agent credential.
    /// Returns the agent's record and its full `<id>.<secret>` credential.
    pub async fn enroll(
        &self,
        token: &str,
        name: &str,
    ) -> Result<(AgentRecord, String), AuthError> {
        let (token_id, token_secret) =
            secret::split_credential(token).ok_or(AuthError::TokenMalformed)?;
        let agent_id = secret::new_id("ag");
        let agent_secret = secret::new_secret();
        let now = now_ms();
        let tkey = token_key(token_id);
        let result = self.tree.transaction(|tx| {
            let Some(raw) = tx.get(&tkey)? else {
                return abort(AuthError::TokenInvalid(token_id.to_string()));
            };
            let mut rec: TokenRecord = match serde_json::from_slice(&raw) {
                Ok(r) => r,
                Err(e) => return abort(self.store.corrupt(token_id, e).into()),
            };
            if !secret::verify(token_secret, &rec.hash) {
                return abort(AuthError::TokenInvalid(token_id.to_string()));
            }
            if rec.revoked {
                return abort(AuthError::TokenRevoked(rec.id));
            }
            if now >= rec.expires_at_ms {
                let ago = Duration::from_secs((now - rec.expires_at_ms) / 1000);
                return abort(AuthError::TokenExpired {
                    id: rec.id,
                    ago: humantime::format_duration(ago).to_string(),
                });
            }
            if rec.uses_left == 0 {
                return abort(AuthError::TokenUsedUp {
                    id: rec.id,
                    uses: rec.uses_total,
                });
            }
            rec.uses_left -= 1;
            let agent = AgentRecord {
                id: agent_id.clone(),
                name: if name.trim().is_empty() {
                    agent_id.clone()
                } else {
                    name.trim().to_string()
                },
                hash: secret::hash(&agent_secret),
                labels: rec.labels.clone(),
                enrolled_at_ms: now,
                token_id: rec.id.clone(),
                revoked: false,
            };
            let encode = |value: &dyn erased_serde_free::Encode| {
                value.encode().map_err(|e| {
                    ConflictableTransactionError::Abort(self.store.corrupt("(encode)", e).into())
                })
            };
            tx.insert(tkey.as_slice(), encode(&rec)?)?;
            tx.insert(agent_key(&agent_id), encode(&agent)?)?;
            Ok(agent)
        });
        let agent = match result {
            Ok(agent) => agent,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(self.store.err(e).into()),
        };
        self.store.commit().await?;
        Ok((agent, format!("{agent_id}.{agent_secret}")))
    }

    /// Checks a presented agent credential (`<id>.<secret>`).
    pub fn verify_agent(&self, presented: &str) -> Result<AgentRecord, AuthError> {
        let (id, secret_part) =
            secret::split_credential(presented).ok_or(AuthError::AgentInvalid)?;
        let rec: AgentRecord = self.get(&agent_key(id))?.ok_or(AuthError::AgentInvalid)?;
        if !secret::verify(secret_part, &rec.hash) {
            return Err(AuthError::AgentInvalid);
        }
        if rec.revoked {
            return Err(AuthError::AgentRevoked(rec.id));
        }
        Ok(rec)
    }

    /// Marks an agent revoked, durably.
    pub async fn revoke_agent(&self, id: &str) -> Result<AgentRecord, AuthError> {
        let key = agent_key(id);
        let mut rec: AgentRecord = self
            .get(&key)?
            .ok_or_else(|| AuthError::NoSuchAgent(id.to_string()))?;
        rec.revoked = true;
        self.put(&key, &rec)?;
        self.store.commit().await?;
        Ok(rec)
    }

    /// Every enrolled agent.
    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, AuthError> {
        self.scan(b"a/")
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> Result<Option<T>, AuthError> {
        match self.tree.get(key).map_err(|e| self.store.err(e))? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| self.store.corrupt(String::from_utf8_lossy(key), e).into()),
        }
    }

    fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), AuthError> {
        let bytes = serde_json::to_vec(value).map_err(|e| self.store.corrupt("(encode)", e))?;
        self.tree
            .insert(key, bytes)
            .map_err(|e| self.store.err(e))?;
        Ok(())
    }

    fn scan<T: for<'de> Deserialize<'de>>(&self, prefix: &[u8]) -> Result<Vec<T>, AuthError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item.map_err(|e| self.store.err(e))?;
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| self.store.corrupt(String::from_utf8_lossy(&k), e))?,
            );
        }
        Ok(out)
    }
}

/// Lets one closure encode records of different types inside a transaction.
mod erased_serde_free {
    pub trait Encode {
        fn encode(&self) -> serde_json::Result<Vec<u8>>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn creds() -> (tempfile::TempDir, Credentials) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = Credentials::open(&store).unwrap();
        (dir, c)
    }

    #[tokio::test]
    async fn token_enrolls_once_then_is_used_up() {
        let (_d, c) = creds().await;
        let (_, token) = c
            .create_token(
                vec!["gpu".into()],
                Duration::from_secs(60),
                1,
                String::new(),
            )
            .await
            .unwrap();
        let (agent, cred) = c.enroll(&token, "box").await.unwrap();
        assert_eq!(agent.labels, vec!["gpu".to_string()]);
        assert_eq!(c.verify_agent(&cred).unwrap().id, agent.id);
        let err = c.enroll(&token, "box2").await.unwrap_err().to_string();
        assert!(err.contains("already been used 1 time"), "{err}");
    }

    #[tokio::test]
    async fn wrong_expired_and_revoked_tokens_are_refused() {
        let (_d, c) = creds().await;
        let (rec, token) = c
            .create_token(vec![], Duration::from_secs(60), 5, String::new())
            .await
            .unwrap();
        let wrong = format!("{}.{}", rec.id, secret::new_secret());
        assert!(matches!(
            c.enroll(&wrong, "x").await,
            Err(AuthError::TokenInvalid(_))
        ));
        assert!(matches!(
            c.enroll("garbage", "x").await,
            Err(AuthError::TokenMalformed)
        ));
        c.revoke_token(&rec.id).await.unwrap();
        assert!(matches!(
            c.enroll(&token, "x").await,
            Err(AuthError::TokenRevoked(_))
        ));
        let (_, expired) = c
            .create_token(vec![], Duration::ZERO, 1, String::new())
            .await
            .unwrap();
        let err = c.enroll(&expired, "x").await.unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");
    }

    #[tokio::test]
    async fn revoked_agents_are_refused() {
        let (_d, c) = creds().await;
        let (_, token) = c
            .create_token(vec![], Duration::from_secs(60), 1, String::new())
            .await
            .unwrap();
        let (agent, cred) = c.enroll(&token, "").await.unwrap();
        assert_eq!(agent.name, agent.id);
        c.revoke_agent(&agent.id).await.unwrap();
        assert!(matches!(
            c.verify_agent(&cred),
            Err(AuthError::AgentRevoked(_))
        ));
        assert!(matches!(
            c.verify_agent("ag_nope.secret"),
            Err(AuthError::AgentInvalid)
        ));
    }

    #[tokio::test]
    async fn concurrent_enrollments_respect_uses() {
        let (_d, c) = creds().await;
        let (_, token) = c
            .create_token(vec![], Duration::from_secs(60), 3, String::new())
            .await
            .unwrap();
        let mut handles = Vec::new();
        for i in 0..10 {
            let c = c.clone();
            let token = token.clone();
            handles.push(tokio::spawn(async move {
                c.enroll(&token, &format!("a{i}")).await.is_ok()
            }));
        }
        let mut ok = 0;
        for h in handles {
            ok += h.await.unwrap() as usize;
        }
        assert_eq!(ok, 3);
        assert_eq!(c.list_agents().unwrap().len(), 3);
    }
}
