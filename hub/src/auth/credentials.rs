//! Enrollment tokens and agent credentials, stored hashed in the `auth` tree.
//!
//! A token is what an operator hands a volunteer (inside the enrollment
//! string); enrolling exchanges it for the agent's own long-lived credential.
//! Each token use and each enrollment is one [`Table::update`] (one
//! read-modify-write at a time, applied atomically), so a token with
//! `uses = 1` can never enroll two agents, even with concurrent attempts.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trunkfarm_proto::v1::Capabilities;

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
    /// What agents enrolled with it are granted (in the place `labels` had
    /// before trust levels, so older records keep their bytes).
    #[serde(flatten)]
    pub(crate) grant: Grant,
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

/// What the hub grants an agent, fixed by the operator when the token is
/// made (the agent only asks: its own claims are capped by this).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Grant {
    /// Labels it carries whatever it claims.
    pub(crate) labels: Vec<String>,
    /// Trusted: may build runtimes, its verdicts need no confirmation.
    /// Records from before trust levels read as volunteers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) trusted: bool,
    /// The most jobs at once it is given; 0 means the hub's default.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) max_parallel_jobs: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Grant {
    /// A volunteer's grant with these labels.
    #[cfg(test)]
    pub(crate) fn volunteer(labels: Vec<String>) -> Grant {
        Grant {
            labels,
            ..Grant::default()
        }
    }

    /// What an agent whose session opens with `caps` gets: the labels of
    /// its grant and of the platform it reports (a claimed label outside
    /// those is refused), and its claimed slots capped by the grant (or by
    /// `default_cap` when the grant sets none).
    pub(crate) fn grant(&self, caps: &Capabilities, default_cap: u32) -> Granted {
        let platform = trunkfarm_proto::platform::labels(&caps.os, &caps.arch);
        let mut labels: BTreeSet<String> = self.labels.iter().cloned().collect();
        let mut refused = Vec::new();
        for claimed in &caps.labels {
            if platform.contains(claimed) {
                labels.insert(claimed.clone());
            } else if !labels.contains(claimed) {
                refused.push(claimed.clone());
            }
        }
        labels.extend(platform);
        let cap = match self.max_parallel_jobs {
            0 => default_cap.max(1),
            n => n,
        };
        let claimed = caps.max_parallel_jobs.max(1);
        Granted {
            labels: labels.into_iter().collect(),
            refused,
            trusted: self.trusted,
            max_parallel_jobs: claimed.min(cap),
            clamped_from: (claimed > cap).then_some(claimed),
        }
    }
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
    /// What its token granted.
    #[serde(flatten)]
    pub(crate) grant: Grant,
    /// When it enrolled.
    pub(crate) enrolled_at_ms: u64,
    /// The token it enrolled with.
    pub(crate) token_id: String,
    /// Revoked by the operator: refused from then on.
    pub(crate) revoked: bool,
    /// How its verdicts fared against confirmation runs, and whether that
    /// quarantined it. Not written while empty (older records keep their
    /// bytes).
    #[serde(default, skip_serializing_if = "Verdicts::is_empty")]
    pub(crate) verdicts: Verdicts,
}

/// An agent's record of confirmations: a volunteer's verdict that would
/// change a series is re-run on another agent (see `pipeline`), and each
/// re-run agrees with it or not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Verdicts {
    /// Confirmations that agreed with it, ever.
    pub(crate) agreed: u64,
    /// Confirmations that disagreed with it, ever.
    pub(crate) disagreed: u64,
    /// The latest confirmations, oldest first: (the re-run's job id,
    /// agreed). The job id makes counting idempotent (a finished job handed
    /// over again after a crash is not counted twice).
    pub(crate) recent: Vec<(u64, bool)>,
    /// Why it is quarantined (given no job); empty when it is not.
    pub(crate) quarantined: String,
    /// When it was quarantined, ms.
    pub(crate) quarantined_at_ms: u64,
}

impl Verdicts {
    fn is_empty(&self) -> bool {
        *self == Verdicts::default()
    }

    /// Whether it is quarantined now.
    pub(crate) fn quarantined(&self) -> bool {
        !self.quarantined.is_empty()
    }

    /// Disagreements among the latest `window` confirmations.
    fn recent_disagreements(&self, window: usize) -> usize {
        let skip = self.recent.len().saturating_sub(window);
        self.recent[skip..].iter().filter(|(_, a)| !a).count()
    }
}

/// When disagreement quarantines an agent (`[trust]` in the hub config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QuarantineRule {
    /// Disagreements among its latest `window` confirmations that
    /// quarantine an agent; 0: never.
    pub(crate) after: u32,
    /// How many of its latest confirmations count.
    pub(crate) window: u32,
}

/// What counting one confirmation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Counted {
    /// This re-run was counted before: nothing changed.
    Before,
    /// Counted now; the agent is not (newly) quarantined.
    Now,
    /// Counted, and it quarantined the agent (the reason).
    Quarantined(String),
}

/// How many confirmations an agent's record keeps (at least the window):
/// enough to recognise a re-run handed over again after a crash.
const RECENT_KEPT: usize = 64;

impl std::fmt::Debug for AgentRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// What the hub gives an agent for one session (see [`Grant::grant`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Granted {
    /// The labels it is matched by, sorted.
    pub(crate) labels: Vec<String>,
    /// Labels it claimed that it was not granted (ignored).
    pub(crate) refused: Vec<String>,
    pub(crate) trusted: bool,
    /// Jobs at once.
    pub(crate) max_parallel_jobs: u32,
    /// It claimed more slots than that.
    pub(crate) clamped_from: Option<u32>,
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
        grant: Grant,
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
            grant,
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

    /// Revokes a token: it enrolls nobody from now on. Returns its record
    /// as revoked (for the operator to see which token that was).
    pub(crate) async fn revoke_token(&self, id: &str) -> Result<TokenRecord, AuthError> {
        let key = token_key(id);
        // An update, so an enrollment taking one of its uses meanwhile
        // cannot write the token back unrevoked.
        let rec = self.table.update(|table, batch| {
            let mut rec: TokenRecord = table
                .get(&key)?
                .ok_or_else(|| AuthError::NoSuchToken(id.to_string()))?;
            rec.revoked = true;
            table.stage(batch, &key, &rec)?;
            Ok::<_, AuthError>(rec)
        })?;
        self.table.store().commit().await?;
        Ok(rec)
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
        let agent = self.table.update(|table, batch| {
            let Some(mut rec) = table.get::<TokenRecord>(&tkey)? else {
                return Err(AuthError::TokenInvalid(token_id.to_string()));
            };
            if !secret::verify(token_secret, &rec.hash) {
                return Err(AuthError::TokenInvalid(token_id.to_string()));
            }
            if rec.revoked {
                return Err(AuthError::TokenRevoked(rec.id));
            }
            if now >= rec.expires_at_ms {
                let ago = Duration::from_secs((now - rec.expires_at_ms) / 1000);
                return Err(AuthError::TokenExpired {
                    id: rec.id,
                    ago: humantime::format_duration(ago).to_string(),
                });
            }
            if rec.uses_left == 0 {
                return Err(AuthError::TokenUsedUp {
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
                grant: rec.grant.clone(),
                enrolled_at_ms: now,
                token_id: rec.id.clone(),
                revoked: false,
                verdicts: Verdicts::default(),
            };
            table.stage(batch, &tkey, &rec)?;
            table.stage(batch, agent_key(&agent_id), &agent)?;
            Ok(agent)
        })?;
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
        self.update_agent(id, |rec| {
            rec.revoked = true;
            Some(())
        })
        .await
        .map(|(rec, _)| rec)
    }

    /// Changes agent `id`'s record with `change`, durably, unless it
    /// returns `None` (nothing to write). Returns the record and what
    /// `change` said. One [`Table::update`]: two changes at once (a
    /// confirmation counted while the agent is revoked) both hold.
    async fn update_agent<T>(
        &self,
        id: &str,
        change: impl FnOnce(&mut AgentRecord) -> Option<T>,
    ) -> Result<(AgentRecord, Option<T>), AuthError> {
        let key = agent_key(id);
        let (rec, said) = self.table.update(|table, batch| {
            let Some(mut rec) = table.get::<AgentRecord>(&key)? else {
                return Err(AuthError::NoSuchAgent(id.to_string()));
            };
            let said = change(&mut rec);
            if said.is_some() {
                table.stage(batch, &key, &rec)?;
            }
            Ok((rec, said))
        })?;
        if said.is_some() {
            self.table.store().commit().await?;
        }
        Ok((rec, said))
    }

    /// Counts one confirmation of agent `id`'s verdict: re-run `job`
    /// `agreed` with it or not. Idempotent per re-run. Disagreements
    /// reaching `rule.after` among its latest `rule.window` confirmations
    /// quarantine it (durably; the caller tells dispatch).
    pub(crate) async fn count_confirmation(
        &self,
        id: &str,
        job: u64,
        agreed: bool,
        rule: QuarantineRule,
    ) -> Result<Counted, AuthError> {
        let (_, counted) = self
            .update_agent(id, |rec| {
                let v = &mut rec.verdicts;
                if v.recent.iter().any(|(j, _)| *j == job) {
                    return None;
                }
                if agreed {
                    v.agreed += 1;
                } else {
                    v.disagreed += 1;
                }
                v.recent.push((job, agreed));
                let keep = RECENT_KEPT.max(rule.window as usize);
                if v.recent.len() > keep {
                    v.recent.drain(..v.recent.len() - keep);
                }
                let bad = v.recent_disagreements(rule.window as usize);
                if rule.after == 0 || bad < rule.after as usize || v.quarantined() {
                    return Some(Counted::Now);
                }
                v.quarantined = format!(
                    "{bad} of its last {} confirmation runs disagreed with its verdict (trust.quarantine_after = {})",
                    v.recent.len().min(rule.window as usize),
                    rule.after
                );
                v.quarantined_at_ms = now_ms();
                Some(Counted::Quarantined(v.quarantined.clone()))
            })
            .await?;
        Ok(counted.unwrap_or(Counted::Before))
    }

    /// Lifts an agent's quarantine (the operator's `agent release`): it
    /// gets jobs again, and its disagreements so far no longer count
    /// towards the next quarantine (its totals stay). Returns the record.
    pub(crate) async fn release_agent(&self, id: &str) -> Result<AgentRecord, AuthError> {
        self.update_agent(id, |rec| {
            let v = &mut rec.verdicts;
            v.quarantined.clear();
            v.quarantined_at_ms = 0;
            for (_, agreed) in &mut v.recent {
                // Kept for idempotence, no longer held against it.
                *agreed = true;
            }
            Some(())
        })
        .await
        .map(|(rec, _)| rec)
    }

    /// The other agents enrolled with the token `agent_id` enrolled with
    /// (one donor's machines, or one person's second identity): no
    /// independent word on that agent's verdict.
    pub(crate) fn enrolled_alongside(&self, agent_id: &str) -> Result<Vec<String>, AuthError> {
        let agents = self.list_agents()?;
        let Some(token) = agents
            .iter()
            .find(|a| a.id == agent_id)
            .map(|a| a.token_id.clone())
        else {
            return Ok(Vec::new());
        };
        Ok(agents
            .into_iter()
            .filter(|a| a.token_id == token && a.id != agent_id)
            .map(|a| a.id)
            .collect())
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

    /// An agent "donor" enrolled with a fresh one-use token.
    async fn donor(c: &Credentials) -> AgentRecord {
        let (_, token) = c
            .create_token(Grant::default(), Duration::from_secs(60), 1, String::new())
            .await
            .unwrap();
        c.enroll(&token, "donor").await.unwrap().0
    }

    #[tokio::test]
    async fn disagreements_within_the_window_quarantine_and_each_rerun_counts_once() {
        let (_d, c) = creds().await;
        let agent = donor(&c).await;
        let rule = QuarantineRule {
            after: 2,
            window: 3,
        };
        let count = |job, agreed| c.count_confirmation(&agent.id, job, agreed, rule);
        assert_eq!(count(1, false).await.unwrap(), Counted::Now);
        assert_eq!(
            count(1, false).await.unwrap(),
            Counted::Before,
            "re-delivered"
        );
        // Job 1's disagreement leaves the window of 3: still one.
        for job in [2, 3] {
            assert_eq!(count(job, true).await.unwrap(), Counted::Now);
        }
        assert_eq!(count(4, false).await.unwrap(), Counted::Now);
        let Counted::Quarantined(why) = count(5, false).await.unwrap() else {
            panic!("two of the last three disagreed");
        };
        assert!(why.contains("2 of its last 3"), "{why}");
        let rec = c.verify_agent(&format!("{}.x", agent.id));
        assert!(rec.is_err(), "a wrong secret is still refused");
        let listed = c.list_agents().unwrap();
        let v = &listed[0].verdicts;
        assert!(v.quarantined());
        assert_eq!((v.agreed, v.disagreed), (2, 3));
        // Released: the old disagreements no longer count, the totals stay.
        let released = c.release_agent(&agent.id).await.unwrap();
        assert!(!released.verdicts.quarantined());
        assert_eq!(released.verdicts.disagreed, 3);
        assert_eq!(count(6, false).await.unwrap(), Counted::Now);
        assert_eq!(count(5, false).await.unwrap(), Counted::Before);
        assert!(matches!(
            c.count_confirmation("ag_nobody", 7, false, rule).await,
            Err(AuthError::NoSuchAgent(_))
        ));
    }

    #[tokio::test]
    async fn token_enrolls_once_then_is_used_up() {
        let (_d, c) = creds().await;
        let (_, token) = c
            .create_token(
                Grant {
                    labels: vec!["gpu".into()],
                    trusted: true,
                    max_parallel_jobs: 3,
                },
                Duration::from_secs(60),
                1,
                String::new(),
            )
            .await
            .unwrap();
        let (agent, cred) = c.enroll(&token, "box").await.unwrap();
        // The agent holds what its token granted, and keeps it on disk.
        let stored = c.verify_agent(&cred).unwrap();
        assert_eq!(stored.grant.labels, vec!["gpu".to_string()]);
        assert!(stored.grant.trusted);
        assert_eq!(stored.grant.max_parallel_jobs, 3);
        assert_eq!(c.verify_agent(&cred).unwrap().id, agent.id);
        let err = c.enroll(&token, "box2").await.unwrap_err().to_string();
        assert!(err.contains("already been used 1 time"), "{err}");
    }

    /// The agent asks, the hub grants: claimed labels outside the token's
    /// and the platform's are refused, slots are capped.
    #[test]
    fn an_agent_gets_what_its_token_grants_not_what_it_claims() {
        let caps = Capabilities {
            labels: vec!["linux-x86_64".into(), "gpu".into(), "big-memory".into()],
            os: "linux".into(),
            arch: "x86_64".into(),
            max_parallel_jobs: 4_000_000_000,
            ..Default::default()
        };
        let volunteer = Grant::volunteer(vec!["gpu".into()]);
        let got = volunteer.grant(&caps, 4);
        assert_eq!(got.labels, ["gpu", "linux", "linux-x86_64", "x86_64"]);
        assert_eq!(got.refused, ["big-memory"]);
        assert!(!got.trusted);
        assert_eq!(got.max_parallel_jobs, 4, "the hub's default cap");
        assert_eq!(got.clamped_from, Some(4_000_000_000));
        let pool = Grant {
            labels: vec![],
            trusted: true,
            max_parallel_jobs: 16,
        };
        let modest = Capabilities {
            max_parallel_jobs: 2,
            ..caps
        };
        let got = pool.grant(&modest, 4);
        assert!(got.trusted);
        assert_eq!(got.max_parallel_jobs, 2, "a claim under the cap stands");
        assert_eq!(got.clamped_from, None);
        assert_eq!(got.refused, ["gpu", "big-memory"]);
    }

    /// Records written before trust levels (no `trusted`, no cap) read as
    /// volunteers with the hub's default cap, and keep their labels.
    #[test]
    fn records_from_before_trust_levels_are_volunteers() {
        let old = br#"{"id":"ag_x","name":"box","hash":"h","labels":["gpu"],"enrolled_at_ms":1,"token_id":"tok_y","revoked":false}"#;
        let rec: AgentRecord = serde_json::from_slice(old).unwrap();
        assert_eq!(rec.grant, Grant::volunteer(vec!["gpu".into()]));
    }

    #[tokio::test]
    async fn wrong_expired_and_revoked_tokens_are_refused() {
        let (_d, c) = creds().await;
        let (rec, token) = c
            .create_token(Grant::default(), Duration::from_secs(60), 5, String::new())
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
        // A token id longer than any key the database holds (the engine
        // would panic on it): an invalid token, and the store goes on.
        let huge = format!("{}.{}", "t".repeat(70_000), secret::new_secret());
        assert!(matches!(
            c.enroll(&huge, "x").await,
            Err(AuthError::TokenInvalid(_))
        ));
        assert!(c.enroll(&token, "after").await.is_ok());
        c.revoke_token(&rec.id).await.unwrap();
        assert!(matches!(
            c.enroll(&token, "x").await,
            Err(AuthError::TokenRevoked(_))
        ));
        let (_, expired) = c
            .create_token(Grant::default(), Duration::ZERO, 1, String::new())
            .await
            .unwrap();
        let err = c.enroll(&expired, "x").await.unwrap_err().to_string();
        assert!(err.contains("expired"), "{err}");
    }

    #[tokio::test]
    async fn revoked_agents_are_refused() {
        let (_d, c) = creds().await;
        let (_, token) = c
            .create_token(Grant::default(), Duration::from_secs(60), 1, String::new())
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
        assert_eq!(agent.grant.labels, ["gpu"]);
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
            .create_token(Grant::default(), Duration::from_secs(60), 3, String::new())
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

    /// Confirmations counted on several threads at once while the agent is
    /// revoked: every count and the revocation hold (each change is one
    /// transaction, not a read then a write that another change undoes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_changes_to_one_agent_all_hold() {
        let (_d, c) = creds().await;
        let agent = donor(&c).await;
        let rule = QuarantineRule {
            after: 0,
            window: 3,
        };
        let mut handles = Vec::new();
        for job in 0..200u64 {
            let c = c.clone();
            let id = agent.id.clone();
            handles.push(tokio::spawn(async move {
                if job == 100 {
                    c.revoke_agent(&id).await.map(|_| ())
                } else {
                    c.count_confirmation(&id, job, job % 2 == 0, rule)
                        .await
                        .map(|_| ())
                }
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        let rec = &c.list_agents().unwrap()[0];
        assert!(rec.revoked, "the revocation was undone");
        assert_eq!(
            (rec.verdicts.agreed, rec.verdicts.disagreed),
            (99, 100),
            "a count was lost"
        );
    }
}
