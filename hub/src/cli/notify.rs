//! Maintainers' commands: `subscribe`, `unsubscribe`, `subscriptions`, and
//! `mail test` / `mail list` for the operator.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use trunkfarm_proto::v1::{
    ListMailRequest, ListSubscriptionsRequest, MailState, SendTestMailRequest, SubscribeRequest,
    Subscription, UnsubscribeRequest,
};

use super::client::AdminClient;
use super::output::{self, Column, Table};
use super::pipeline::upstream_or_only;
use super::{status_error, view, when};
use crate::config::HubConfig;

/// Who subscribes to what.
#[derive(Args)]
pub(super) struct SubscriptionArgs {
    /// The address mails go to.
    #[arg(long)]
    email: String,
    /// The project whose went-red and fixed events are mailed.
    #[arg(long, required_unless_present = "digest")]
    project: Option<String>,
    /// Only results on this platform.
    #[arg(long)]
    platform: Option<String>,
    /// Only results against this upstream (with --digest: the upstream digested).
    #[arg(long)]
    upstream: Option<String>,
    /// A daily digest of everything that went red in --upstream (default:
    /// the only one) instead.
    #[arg(long, conflicts_with_all = ["project", "platform"])]
    digest: bool,
}

impl SubscriptionArgs {
    /// The subscription meant; a digest is of the only upstream unless one
    /// is named.
    async fn subscription(self, client: &mut AdminClient) -> anyhow::Result<Subscription> {
        let upstream = if self.digest {
            upstream_or_only(client, self.upstream, "--upstream NAME").await?
        } else {
            self.upstream.unwrap_or_default()
        };
        Ok(Subscription {
            email: self.email,
            project: self.project.unwrap_or_default(),
            platform: self.platform.unwrap_or_default(),
            upstream,
            digest: self.digest,
            ..Default::default()
        })
    }
}

/// `trunkfarm mail …`.
#[derive(Subcommand)]
pub(super) enum MailCommand {
    /// Send a test mail now with the running hub's [smtp] settings (not
    /// those of the --config given, if they differ) and print the server's
    /// answer.
    Test {
        /// The recipient.
        #[arg(long)]
        to: String,
    },
    /// The outbox: pending, sent and failed mails, newest first.
    List {
        /// Only mails in this state: pending, sent, failed.
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `trunkfarm subscribe`.
pub(super) async fn subscribe(cfg: &HubConfig, args: SubscriptionArgs) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let sub = args.subscription(&mut client).await?;
    let created = client
        .subscribe(SubscribeRequest {
            subscription: Some(sub.clone()),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .created;
    let what = if sub.digest {
        format!("the {} digest", sub.upstream)
    } else {
        format!("{} went red / fixed mails", sub.project)
    };
    if created {
        eprintln!("{} is subscribed to {what}", sub.email);
    } else {
        eprintln!("{} was already subscribed to {what} (updated)", sub.email);
    }
    Ok(ExitCode::SUCCESS)
}

/// `trunkfarm unsubscribe`.
pub(super) async fn unsubscribe(
    cfg: &HubConfig,
    args: SubscriptionArgs,
) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let sub = args.subscription(&mut client).await?;
    let removed = client
        .unsubscribe(UnsubscribeRequest {
            subscription: Some(sub.clone()),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .removed;
    if removed {
        eprintln!("{} is unsubscribed", sub.email);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} had no such subscription", sub.email);
        Ok(ExitCode::from(1))
    }
}

/// `trunkfarm subscriptions`.
pub(super) async fn list(
    cfg: &HubConfig,
    project: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    let subs = client
        .list_subscriptions(ListSubscriptionsRequest {
            project: project.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .subscriptions;
    if json {
        output::json_list::<_, view::Subscription>(&subs)?;
        return Ok(ExitCode::SUCCESS);
    }
    const COLUMNS: &[Column] = &[
        Column::left("EMAIL", 32),
        Column::left("PROJECT", 20),
        Column::left("PLATFORM", 16),
        Column::left("UPSTREAM", 12),
        Column::last("SOURCE"),
    ];
    let table = Table::new(COLUMNS);
    let any = |s: &str| if s.is_empty() { "any" } else { s }.to_owned();
    for s in subs {
        let project = if s.digest {
            "(digest)".to_owned()
        } else {
            s.project
        };
        table.row(&[
            &s.email,
            &project,
            &any(&s.platform),
            &any(&s.upstream),
            &s.source,
        ]);
    }
    Ok(ExitCode::SUCCESS)
}

/// Says whose `[smtp]` sent the test mail: the running hub's, which may
/// not be what the `--config` file given to this command says.
fn test_mail_note(to: &str, sender: &str, cfg: &HubConfig) -> String {
    let mut note = format!(
        "test mail to {to} accepted, sent by the running hub with its own [smtp]: {sender}"
    );
    if let Some(path) = &cfg.source {
        note.push_str(&format!(
            "\n(if the [smtp] in {} differs, the hub uses it only once restarted with it)",
            path.display()
        ));
    }
    note
}

/// `trunkfarm mail …`.
pub(super) async fn mail(cfg: &HubConfig, command: MailCommand) -> anyhow::Result<ExitCode> {
    let mut client = super::client::connect(cfg).await?;
    match command {
        MailCommand::Test { to } => {
            let answer = client
                .send_test_mail(SendTestMailRequest { to: to.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", answer.response);
            eprintln!("{}", test_mail_note(&to, &answer.sender, cfg));
        }
        MailCommand::List { state, limit, json } => {
            let state = match state.as_deref() {
                None => MailState::Unspecified,
                Some("pending") => MailState::Pending,
                Some("sent") => MailState::Sent,
                Some("failed") => MailState::Failed,
                Some(other) => {
                    anyhow::bail!("{other:?} is not a mail state; use pending, sent or failed")
                }
            };
            let resp = client
                .list_mail(ListMailRequest {
                    limit,
                    state: state.into(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json {
                output::json(&view::MailList::from(&resp))?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("delivery: {}", resp.sender);
            const COLUMNS: &[Column] = &[
                Column::left("MAIL", 8),
                Column::left("STATE", 8),
                Column::left("TRY", 4),
                Column::left("WHEN", 22),
                Column::left("TO", 28),
                Column::last("SUBJECT"),
            ];
            let table = Table::new(COLUMNS);
            for m in resp.mails {
                let at = if m.sent_at_ms > 0 {
                    m.sent_at_ms
                } else {
                    m.created_at_ms
                };
                table.row(&[
                    &m.id,
                    &view::mail_state(m.state()),
                    &m.attempts,
                    &when(at),
                    &m.to,
                    &m.subject,
                ]);
                if m.state == MailState::Failed as i32 {
                    println!("         refused for good: {}", m.last_error);
                } else if !m.last_error.is_empty() {
                    println!(
                        "         last error: {} (next try {})",
                        m.last_error,
                        when(m.next_attempt_at_ms)
                    );
                } else if m.state == MailState::Pending as i32
                    && m.attempts == 0
                    && m.next_attempt_at_ms > 0
                {
                    // Only a went-red mail waiting for its bisection is
                    // due later without having been tried.
                    println!(
                        "         held for the bisection's first bad commit until {}",
                        when(m.next_attempt_at_ms)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_test_mail_says_it_went_by_the_running_hubs_smtp() {
        let sender = "smtp relay.example.org:587 (starttls)";
        let mut cfg = HubConfig::default_for(PathBuf::from("data"));
        let note = test_mail_note("ada@example.org", sender, &cfg);
        assert!(
            note.contains("running hub with its own [smtp]: smtp relay.example.org:587"),
            "{note}"
        );
        cfg.source = Some(PathBuf::from("other.toml"));
        let note = test_mail_note("ada@example.org", sender, &cfg);
        assert!(
            note.contains("if the [smtp] in other.toml differs"),
            "{note}"
        );
    }
}
