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
use crate::store::{Store, StoreError, Table, now_ms, trees};

/// Why an authentication or credential operation was refused. The messages
/// are shown to volunteers and operators as they are.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
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
pub(crate) struct TokenRecord {
    /// `tok_…`
    pub(crate) id: String,
    /// SHA-256 of the secret.
    pub(crate) hash: String,
    /// Labels granted to agents enrolled with it.
    pub(crate) labels: Vec<String>,
    /// When it was created.
    pub(crate) created_at_ms: u64,
    /// When it stops working.
    pub(crate) expires_at_ms: u64,
    /// How many enrollments it allows in all.
    pub(crate) uses_total: u32,
    /// How many remain.
    pub(crate) uses_left: u32,
    /// Revoked by the operator.
    pub(crate) revoked: bool,
    /// Free text from the operator.
    #[serde(default)]
    pub(crate) note: String,
}

/// A stored agent identity.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct AgentRecord {
    /// `ag_…`
    pub(crate) id: String,
    /// The name the volunteer chose.
    pub(crate) name: String,
    /// SHA-256 of the agent's secret.
    pub(crate) hash: String,
    /// Labels granted by its token.
    pub(crate) labels: Vec<String>,
    /// When it enrolled.
    pub(crate) enrolled_at_ms: u64,
    /// The token it enrolled with.
    pub(crate) token_id: String,
    /// Revoked by the operator: refused from then on.
    pub(crate) revoked: bool,
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
pub(crate) struct Credentials {
    table: Table,
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

/// Aborts a sled transaction with a store error (a record that does not
/// decode or encode).
fn stored(e: StoreError) -> ConflictableTransactionError<AuthError> {
    ConflictableTransactionError::Abort(e.into())
}

impl Credentials {
    /// Opens the `auth` tree.
    pub(crate) fn open(store: &Store) -> Result<Credentials, StoreError> {
        Ok(Credentials {
            table: Table::open(store, trees::AUTH)?,
        })
    }

    /// Creates a token; returns its record and the full `<id>.<secret>` token.
    pub(crate) async fn create_token(
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
        self.table.put(token_key(&id), &rec)?;
        self.table.store().commit().await?;
        Ok((rec, format!("{id}.{secret}")))
    }

    /// Every token, newest first.
    pub(crate) fn list_tokens(&self) -> Result<Vec<TokenRecord>, AuthError> {
        let mut out = self
            .table
            .scan::<TokenRecord>("t/")
            .map(|item| item.map(|(_, rec)| rec))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|t| std::cmp::Reverse(t.created_at_ms));
        Ok(out)
    }

    /// Revokes a token: it enrolls nobody from now on.
    pub(crate) async fn revoke_token(&self, id: &str) -> Result<(), AuthError> {
        let key = token_key(id);
        let mut rec: TokenRecord = self
            .table
            .get(&key)?
            .ok_or_else(|| AuthError::NoSuchToken(id.to_string()))?;
        rec.revoked = true;
        self.table.put(&key, &rec)?;
        self.table.store().commit().await?;
        Ok(())
    }

    /// Exchanges a token (`<id>.<secret>`) for a new agent credential.
    /// Returns the agent's record and its full `<id>.<secret>` credential.
    pub(crate) async fn enroll(
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
        // One transaction over the token and the new agent, so concurrent
        // enrollments cannot both take a token's last use.
        let result = self.table.sled().transaction(|tx| {
            let Some(raw) = tx.get(&tkey)? else {
                return abort(AuthError::TokenInvalid(token_id.to_string()));
            };
            let mut rec: TokenRecord = self.table.decode(&tkey, &raw).map_err(stored)?;
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
            tx.insert(tkey.as_slice(), self.table.encode(&rec).map_err(stored)?)?;
            tx.insert(
                agent_key(&agent_id),
                self.table.encode(&agent).map_err(stored)?,
            )?;
            Ok(agent)
        });
        let agent = match result {
            Ok(agent) => agent,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(self.table.store().err(e).into()),
        };
        self.table.store().commit().await?;
        Ok((agent, format!("{agent_id}.{agent_secret}")))
    }

    /// Checks a presented agent credential (`<id>.<secret>`).
    pub(crate) fn verify_agent(&self, presented: &str) -> Result<AgentRecord, AuthError> {
        let (id, secret_part) =
            secret::split_credential(presented).ok_or(AuthError::AgentInvalid)?;
        let rec: AgentRecord = self
            .table
            .get(agent_key(id))?
            .ok_or(AuthError::AgentInvalid)?;
        if !secret::verify(secret_part, &rec.hash) {
            return Err(AuthError::AgentInvalid);
        }
        if rec.revoked {
            return Err(AuthError::AgentRevoked(rec.id));
        }
        Ok(rec)
    }

    /// Marks an agent revoked, durably.
    pub(crate) async fn revoke_agent(&self, id: &str) -> Result<AgentRecord, AuthError> {
        let key = agent_key(id);
        let mut rec: AgentRecord = self
            .table
            .get(&key)?
            .ok_or_else(|| AuthError::NoSuchAgent(id.to_string()))?;
        rec.revoked = true;
        self.table.put(&key, &rec)?;
        self.table.store().commit().await?;
        Ok(rec)
    }

    /// Every enrolled agent.
    pub(crate) fn list_agents(&self) -> Result<Vec<AgentRecord>, AuthError> {
        Ok(self
            .table
            .scan::<AgentRecord>("a/")
            .map(|item| item.map(|(_, rec)| rec))
            .collect::<Result<Vec<_>, _>>()?)
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
    async fn records_of_the_previous_release_still_enroll_and_verify() {
        let (_d, c) = creds().await;
        let token_secret = secret::new_secret();
        // Written before tokens had a note: it reads as an empty one.
        let old_token = format!(
            r#"{{"id":"tok_old","hash":"{}","labels":["gpu"],"created_at_ms":1,"expires_at_ms":18446744073709551615,"uses_total":2,"uses_left":2,"revoked":false}}"#,
            secret::hash(&token_secret)
        );
        c.table.put_raw("t/tok_old", old_token.as_bytes()).unwrap();
        let agent_secret = secret::new_secret();
        let old_agent = format!(
            r#"{{"id":"ag_old","name":"box","hash":"{}","labels":[],"enrolled_at_ms":1,"token_id":"tok_old","revoked":false}}"#,
            secret::hash(&agent_secret)
        );
        c.table.put_raw("a/ag_old", old_agent.as_bytes()).unwrap();

        assert_eq!(c.list_tokens().unwrap()[0].note, "");
        let verified = c.verify_agent(&format!("ag_old.{agent_secret}")).unwrap();
        assert_eq!(verified.name, "box");
        let (agent, _) = c
            .enroll(&format!("tok_old.{token_secret}"), "new")
            .await
            .unwrap();
        assert_eq!(agent.labels, ["gpu"]);
        let raw = c.table.get_raw("t/tok_old").unwrap().unwrap();
        assert_eq!(
            String::from_utf8(raw.to_vec()).unwrap(),
            old_token.replace(
                r#""uses_left":2,"revoked":false}"#,
                r#""uses_left":1,"revoked":false,"note":""}"#
            ),
            "the same fields, names and order as before"
        );
    }

    #[tokio::test]
    async fn an_unreadable_token_is_named_when_enrolling() {
        let (_d, c) = creds().await;
        c.table.put_raw("t/tok_bad", &b"{not json"[..]).unwrap();
        let err = c.enroll("tok_bad.secret", "x").await.unwrap_err();
        assert!(matches!(err, AuthError::Store(_)), "{err:?}");
        assert!(err.to_string().contains("record auth/t/tok_bad"), "{err}");
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
