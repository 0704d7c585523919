//! What a mail says: subject, plain text and an HTML part, for a transition
//! (went red, fixed), a still-red reminder, a failed runtime build, a digest
//! and a test mail. Pure functions of their inputs, so they are easy to test.
//!
//! Much of a mail is written by others: the log tail and the test names
//! come from a job (a hostile test suite can print anything), commit
//! subjects and authors from a repository, a culprit error from git. All of
//! it goes through [`untrusted`] — terminal escapes and other control
//! characters removed, URLs defanged (`https[:]//…`) so that a mail client
//! that links plain text does not — and in the HTML part only the URLs the
//! hub made (the run, the history, unsubscribe) are links: a job cannot put
//! a phishing link into a mail that comes from the hub.

use std::fmt::Write as _;

use trunkfarm_proto::v1::TransitionKind;

use crate::commit::short;
use crate::results::{BisectState, Class, Commit, RunInfo, TestCase, Transition};

/// Failing tests whose messages a mail quotes.
const QUOTED_TESTS: usize = 10;

/// Everything a mail about one transition needs besides the transition.
pub(crate) struct Context<'a> {
    /// The upstream's branch (for "cpython main 3f2a9c1").
    pub(crate) branch: &'a str,
    /// What a went-red mail quotes of the failing job's log.
    pub(crate) log: &'a Quote,
    /// The failing run (its failing tests' JUnit messages are quoted before
    /// the log; a suspicious one's test counts are shown).
    pub(crate) run: Option<&'a RunInfo>,
    /// Base URL of the hub's web endpoint (no trailing slash).
    pub(crate) public_url: &'a str,
    /// The recipient's one-click unsubscribe link.
    pub(crate) unsubscribe_url: &'a str,
    /// For a reminder: how many days red, and the reminder's number.
    pub(crate) reminder: Option<(u64, u32)>,
    /// The follow-up of a went-red mail, once its bisection ended.
    pub(crate) follow_up: bool,
}

/// The lines of a job's log a mail quotes.
#[derive(Debug, Default)]
pub(crate) enum Quote {
    /// Nothing (no log, or not a went-red mail).
    #[default]
    Nothing,
    /// The lines around the first failures (fail pattern or markers).
    Excerpt(String),
    /// The last lines.
    Tail(String),
}

/// Subject, text and HTML of a mail.
pub(crate) struct Rendered {
    /// The subject line.
    pub(crate) subject: String,
    /// The plain-text part.
    pub(crate) text: String,
    /// The HTML part.
    pub(crate) html: String,
}

/// The mail for a transition (went red, fixed, or a reminder of a red one).
pub(crate) fn transition(t: &Transition, ctx: &Context<'_>) -> Rendered {
    if t.class == Some(Class::Suspicious) && ctx.reminder.is_none() {
        return suspicious(t, ctx);
    }
    let kind = TransitionKind::try_from(t.kind).unwrap_or(TransitionKind::Unspecified);
    let subject_of = if t.project.is_empty() {
        format!("{} {} build", t.upstream, ctx.branch)
    } else {
        t.project.clone()
    };
    let what = match (kind, ctx.reminder) {
        (_, Some((days, _))) => format!("still red ({days} days)"),
        (TransitionKind::WentRed, _) if t.project.is_empty() => "failed".to_owned(),
        (TransitionKind::WentRed, _) => "went red".to_owned(),
        (TransitionKind::Fixed, _) => "fixed".to_owned(),
        (TransitionKind::StillRed, _) => "still red".to_owned(),
        _ => "still green".to_owned(),
    };
    let project_side = t.class == Some(Class::ProjectSide);
    let subject = if t.project.is_empty() {
        format!(
            "[trunkfarm] {subject_of} {what} on {} at {}",
            t.platform,
            short(&t.upstream_commit)
        )
    } else if project_side {
        format!(
            "[trunkfarm] {subject_of} {what} on {}: its own commit {}",
            t.platform,
            short(&t.project_commit)
        )
    } else {
        format!(
            "[trunkfarm] {subject_of} {what} on {} with {} {} {}",
            t.platform,
            t.upstream,
            ctx.branch,
            short(&t.upstream_commit)
        )
    };
    let mut text = String::new();
    let run_url = format!("{}/runs/{}", ctx.public_url, t.job_id);
    let history_url = if t.project.is_empty() {
        format!("{}/upstreams/{}", ctx.public_url, t.upstream)
    } else {
        format!("{}/projects/{}", ctx.public_url, t.project)
    };
    let subject = if ctx.follow_up {
        format!("Re: {subject}")
    } else {
        subject
    };
    if ctx.follow_up {
        let _ = writeln!(text, "{}", bisection_ended(t));
        let _ = writeln!(text);
    }
    let _ = writeln!(
        text,
        "{subject_of} {what} on {} with {} {} {}.",
        t.platform,
        t.upstream,
        ctx.branch,
        short(&t.upstream_commit)
    );
    if let Some(class) = t.class {
        let _ = writeln!(text, "Class: {}", class.word());
        let _ = writeln!(text, "  ({})", class_means(class, &t.upstream));
    }
    let _ = writeln!(text);
    let upstream_blamed = !matches!(t.class, Some(Class::ProjectSide | Class::Broken));
    if (kind == TransitionKind::WentRed || ctx.reminder.is_some()) && !upstream_blamed {
        if project_side {
            let _ = writeln!(
                text,
                "The project's own commit {} broke it: it fails on the previous runtime too.",
                short(&t.project_commit)
            );
            if !t.previous_project_commit.is_empty() {
                let _ = writeln!(
                    text,
                    "(Its previous commit was {}.)",
                    short(&t.previous_project_commit)
                );
            }
        } else {
            let _ = writeln!(
                text,
                "It fails on the previous runtime too, and the project's commit did not change:"
            );
            let _ = writeln!(text, "no {} commit is blamed.", t.upstream);
        }
        why_it_failed(&mut text, t, ctx);
    } else if kind == TransitionKind::WentRed || ctx.reminder.is_some() {
        let found = first_bad(t);
        if let Some(c) = found {
            let _ = writeln!(text, "First bad commit: {}", culprit(c));
            let builds = t.bisect.as_ref().map_or(0, |b| b.builds);
            let _ = writeln!(
                text,
                "  (found by bisecting the {} commit(s) after the last green {}; {builds} build(s))",
                t.culprits.len(),
                short(&t.last_green_upstream_commit)
            );
        } else if t.last_green_upstream_commit.is_empty() {
            let _ = writeln!(
                text,
                "There is no green result before this one, so the culprit range is unknown;"
            );
            let _ = writeln!(text, "the commit tested:");
        } else {
            match &t.bisect {
                Some(b) if b.state == BisectState::Running => {
                    let _ = writeln!(
                        text,
                        "Bisecting the {} commits after the last green {}...",
                        t.culprits.len(),
                        short(&t.last_green_upstream_commit)
                    );
                    let _ = writeln!(
                        text,
                        "A follow-up in this thread will name the first bad commit. The range:"
                    );
                }
                Some(b) if b.state == BisectState::Range => {
                    let _ = writeln!(
                        text,
                        "Bisection narrowed it to {} commits (the others did not build):",
                        b.candidates.len()
                    );
                }
                Some(b) if b.state == BisectState::GaveUp => {
                    let _ = writeln!(text, "Bisection gave up: {}", untrusted(&b.detail));
                    let _ = writeln!(
                        text,
                        "Culprit range ({} commit(s) after the last green {}):",
                        t.culprits.len(),
                        short(&t.last_green_upstream_commit)
                    );
                }
                _ => {
                    let _ = writeln!(
                        text,
                        "Culprit range ({} commit(s) after the last green {}):",
                        t.culprits.len(),
                        short(&t.last_green_upstream_commit)
                    );
                }
            }
        }
        let listed = match &t.bisect {
            _ if found.is_some() => &[][..],
            Some(b) if b.state == BisectState::Range => &b.candidates[..],
            _ => &t.culprits[..],
        };
        for c in listed {
            if c.subject.is_empty() {
                let _ = writeln!(text, "  {}", short(&c.sha));
            } else {
                let _ = writeln!(text, "  {}", culprit(c));
            }
        }
        if !t.culprits_error.is_empty() && found.is_none() {
            let _ = writeln!(text, "  ({})", untrusted(&t.culprits_error));
        }
        let _ = writeln!(text);
        if t.project_commit_changed {
            let _ = writeln!(
                text,
                "The project's own commit changed too: {} -> {}.",
                short(&t.previous_project_commit),
                short(&t.project_commit)
            );
        } else if !t.project.is_empty() {
            let _ = writeln!(
                text,
                "The project's own commit did not change ({}).",
                if t.project_commit.is_empty() {
                    "its branch"
                } else {
                    short(&t.project_commit)
                }
            );
        }
        why_it_failed(&mut text, t, ctx);
    } else if kind == TransitionKind::Fixed {
        let _ = writeln!(text, "It is green again with this commit.");
    }
    let _ = writeln!(text);
    signed(
        subject,
        text,
        &subject_of,
        &run_url,
        &history_url,
        ctx.unsubscribe_url,
    )
}

/// Ends a transition's mail: the links to the run and the history, why
/// the recipient gets it and how to stop; and makes its HTML part.
fn signed(
    subject: String,
    mut text: String,
    subject_of: &str,
    run_url: &str,
    history_url: &str,
    unsubscribe_url: &str,
) -> Rendered {
    let _ = writeln!(text, "The run:     {run_url}");
    let _ = writeln!(text, "The history: {history_url}");
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "You get this because you subscribed to {subject_of} on this trunkfarm hub."
    );
    let _ = writeln!(text, "Unsubscribe: {unsubscribe_url}");
    let html = html_of(
        &subject,
        &text,
        &[run_url, history_url, unsubscribe_url],
        unsubscribe_url,
    );
    Rendered {
        subject,
        text,
        html,
    }
}

/// A went-red mail's evidence: the newly failing tests, what the failing
/// tests said (JUnit messages), then the log (the lines around the first
/// failures, or its tail).
fn why_it_failed(text: &mut String, t: &Transition, ctx: &Context<'_>) {
    if !t.newly_failing.is_empty() {
        let _ = writeln!(text);
        let _ = writeln!(text, "Newly failing tests:");
        for name in t.newly_failing.iter().take(50) {
            let _ = writeln!(text, "  {}", untrusted(name));
        }
        if t.newly_failing.len() > 50 {
            let _ = writeln!(text, "  ... and {} more", t.newly_failing.len() - 50);
        }
    }
    let failing = ctx.run.map_or(&[][..], |r| &r.failing_tests[..]);
    let said: Vec<&TestCase> = failing
        .iter()
        .filter(|c| !c.message.trim().is_empty())
        .collect();
    if !said.is_empty() {
        let _ = writeln!(text);
        let _ = writeln!(text, "What the failing tests said:");
        for case in said.iter().take(QUOTED_TESTS) {
            let _ = writeln!(text, "  {}", untrusted(&case.name));
            for line in untrusted(&case.message).lines() {
                let _ = writeln!(text, "    {line}");
            }
        }
        if said.len() > QUOTED_TESTS {
            let _ = writeln!(text, "  ... and {} more", said.len() - QUOTED_TESTS);
        }
    }
    let (heading, lines) = match ctx.log {
        Quote::Excerpt(lines) => ("From the log, around the first failures:", lines),
        Quote::Tail(lines) => ("Last lines of the log:", lines),
        Quote::Nothing => return,
    };
    if !lines.trim().is_empty() {
        let _ = writeln!(text);
        let _ = writeln!(text, "{heading}");
        for line in untrusted(lines).lines() {
            let _ = writeln!(text, "  | {line}");
        }
    }
}

/// The first bad commit, when `t`'s bisection found one.
fn first_bad(t: &Transition) -> Option<&Commit> {
    let b = t
        .bisect
        .as_ref()
        .filter(|b| b.state == BisectState::Found)?;
    b.first_bad.as_ref()
}

/// What a class means, in a few words for the mail.
fn class_means(class: Class, upstream: &str) -> String {
    match class {
        Class::Regressed => {
            format!("confirmed: it fails again on a re-run and passes on the last good {upstream}")
        }
        Class::Flaky => "it passed on an identical re-run".to_owned(),
        Class::Spurious => "the machine failed, not the tests".to_owned(),
        Class::ProjectSide => {
            "the project broke itself: it fails on the previous runtime too".to_owned()
        }
        Class::Broken => {
            "it fails on the previous runtime too and the project did not change".to_owned()
        }
        Class::Suspicious => {
            "green, but far fewer of its tests ran (or many more were skipped) than before"
                .to_owned()
        }
    }
}

/// The first line of a follow-up: how the bisection ended.
fn bisection_ended(t: &Transition) -> String {
    let Some(b) = &t.bisect else {
        return "Bisection finished.".to_owned();
    };
    match (b.state, &b.first_bad) {
        (BisectState::Found, Some(c)) => format!(
            "Bisection finished: the first bad commit is {}.",
            short(&c.sha)
        ),
        (BisectState::Range, _) => format!(
            "Bisection finished: one of {} commits is the first bad one.",
            b.candidates.len()
        ),
        (BisectState::GaveUp, _) => "Bisection gave up without an answer.".to_owned(),
        _ => "Bisection finished.".to_owned(),
    }
}

/// The mail to the author of a first bad commit: the projects it broke.
/// `broke` is (project, platform, run URL) per project.
pub(crate) fn first_bad_author(
    upstream: &str,
    branch: &str,
    commit: &Commit,
    broke: &[(String, String, String)],
) -> Rendered {
    let subject = format!(
        "[trunkfarm] your {upstream} commit {} broke {} project(s)",
        short(&commit.sha),
        broke.len()
    );
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Bisection found your commit to be the first bad one in {upstream} {branch}:"
    );
    let _ = writeln!(text);
    let _ = writeln!(text, "First bad commit: {}", culprit(commit));
    let _ = writeln!(text);
    let _ = writeln!(text, "Projects it broke:");
    for (project, platform, run_url) in broke {
        let _ = writeln!(text, "  {project} on {platform}: {run_url}");
    }
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "You get this because {upstream} mails the authors of commits its bisections find"
    );
    let _ = writeln!(
        text,
        "(notify_authors); projects found later for the same commit are not mailed again."
    );
    let links: Vec<&str> = broke.iter().map(|(_, _, url)| url.as_str()).collect();
    let html = html_of(&subject, &text, &links, "");
    Rendered {
        subject,
        text,
        html,
    }
}

/// The mail for a suspicious green (once per spell): green, but its JUnit
/// counts fell against the series' previous runs. Says the counts, the
/// upstream commit and the commits since the last usual run.
fn suspicious(t: &Transition, ctx: &Context<'_>) -> Rendered {
    let subject = format!(
        "[trunkfarm] {} looks suspicious on {} with {} {} {}: {}",
        t.project,
        t.platform,
        t.upstream,
        ctx.branch,
        short(&t.upstream_commit),
        untrusted(&t.suspicious)
    );
    let run_url = format!("{}/runs/{}", ctx.public_url, t.job_id);
    let history_url = format!("{}/projects/{}", ctx.public_url, t.project);
    let mut text = String::new();
    let subject = match ctx.follow_up {
        true => format!("Re: {subject}"),
        false => subject,
    };
    if ctx.follow_up {
        let _ = writeln!(text, "{}", bisection_ended(t));
        let _ = writeln!(text);
    }
    let _ = writeln!(
        text,
        "{} passed on {} with {} {} {}, but its test reports changed sharply:",
        t.project,
        t.platform,
        t.upstream,
        ctx.branch,
        short(&t.upstream_commit)
    );
    let _ = writeln!(text, "Class: {}", Class::Suspicious.word());
    let _ = writeln!(text);
    let _ = writeln!(text, "  {}", untrusted(&t.suspicious));
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "(its usual counts are the median of its previous runs). Tests that are skipped or no longer"
    );
    let _ = writeln!(
        text,
        "reported are not tested: a trunk change may have made the suite skip them."
    );
    let _ = writeln!(text);
    let found = first_bad(t);
    if let Some(c) = found {
        // Bisected like a regression: the commit after which it changed.
        let _ = writeln!(text, "First bad commit: {}", culprit(c));
        let _ = writeln!(
            text,
            "  (found by bisecting the {} commit(s) after the last usual run {})",
            t.culprits.len(),
            short(&t.last_green_upstream_commit)
        );
    } else if t.last_green_upstream_commit.is_empty() {
        let _ = writeln!(text, "The upstream commit: {}", short(&t.upstream_commit));
    } else {
        let _ = writeln!(
            text,
            "Upstream commits since the last usual run {} ({}):",
            short(&t.last_green_upstream_commit),
            t.culprits.len()
        );
    }
    for c in t.culprits.iter().filter(|_| found.is_none()) {
        match c.subject.is_empty() {
            true => writeln!(text, "  {}", short(&c.sha)),
            false => writeln!(text, "  {}", culprit(c)),
        }
        .ok();
    }
    if !t.culprits_error.is_empty() {
        let _ = writeln!(text, "  ({})", untrusted(&t.culprits_error));
    }
    if t.project_commit != t.previous_project_commit && !t.previous_project_commit.is_empty() {
        let _ = writeln!(
            text,
            "The project's own commit changed too: {} -> {}.",
            short(&t.previous_project_commit),
            short(&t.project_commit)
        );
    }
    let _ = writeln!(text);
    let _ = writeln!(
        text,
        "You get one mail per suspicious spell: none for the next such runs."
    );
    signed(
        subject,
        text,
        &t.project,
        &run_url,
        &history_url,
        ctx.unsubscribe_url,
    )
}

/// A digest: everything that went red in an upstream during one period.
pub(crate) fn digest(
    upstream: &str,
    went_red: &[Transition],
    public_url: &str,
    unsubscribe_url: &str,
) -> Rendered {
    let subject = format!(
        "[trunkfarm] {upstream} digest: {} project(s) went red",
        went_red.len()
    );
    let mut text = format!("What went red in {upstream} since the last digest:\n\n");
    let run_urls: Vec<String> = went_red
        .iter()
        .map(|t| format!("{public_url}/runs/{}", t.job_id))
        .collect();
    for (t, run_url) in went_red.iter().zip(&run_urls) {
        let what = if t.project.is_empty() {
            "the runtime build".to_owned()
        } else {
            t.project.clone()
        };
        let _ = writeln!(
            text,
            "- {what} on {} at {} ({} culprit commit(s)){}",
            t.platform,
            short(&t.upstream_commit),
            t.culprits.len(),
            if t.newly_failing.is_empty() {
                String::new()
            } else {
                format!(
                    "; newly failing: {}",
                    untrusted(&t.newly_failing.join(", "))
                )
            }
        );
        match first_bad(t) {
            Some(c) => {
                let _ = writeln!(text, "    First bad commit: {}", culprit(c));
            }
            None => {
                for c in t.culprits.iter().take(5) {
                    let _ = writeln!(text, "    {}", culprit(c));
                }
            }
        }
        let _ = writeln!(text, "    {run_url}");
    }
    let _ = writeln!(text, "\nUnsubscribe from this digest: {unsubscribe_url}");
    let mut links: Vec<&str> = run_urls.iter().map(String::as_str).collect();
    links.push(unsubscribe_url);
    let html = html_of(&subject, &text, &links, unsubscribe_url);
    Rendered {
        subject,
        text,
        html,
    }
}

/// What a subscription confirmation mail links to and says.
pub(crate) struct Confirmation<'a> {
    /// The hub's name (`hub.hub_id`).
    pub(crate) hub: &'a str,
    /// The address that asked, which this mail goes to.
    pub(crate) email: &'a str,
    pub(crate) project: &'a str,
    /// The signed link that subscribes (after a button press).
    pub(crate) link: &'a str,
    /// The project's page.
    pub(crate) project_url: &'a str,
    /// How long the link works, as people say it ("24h").
    pub(crate) lifetime: &'a str,
    /// When it stops working ("2026-12-08 06:20 UTC").
    pub(crate) expires: &'a str,
}

/// The mail that asks an address to confirm its self-service subscription
/// (double opt-in): who asked cannot be known, so it says how to ignore it.
pub(crate) fn confirm_subscription(c: &Confirmation<'_>) -> Rendered {
    let subject = format!("[trunkfarm] confirm your subscription to {}", c.project);
    let email = untrusted(c.email);
    let text = format!(
        "Someone (we hope you) asked the trunkfarm hub {hub} to mail {email} when {project} goes red or is fixed.\n\n\
         To subscribe, open this link and press the button on the page. It works for {lifetime}, until {expires}:\n\
         {link}\n\n\
         Nothing is subscribed until then. If you did not ask for this, ignore this mail: you will hear nothing more.\n\n\
         {project}'s page: {project_url}\n",
        hub = c.hub,
        project = c.project,
        lifetime = c.lifetime,
        expires = c.expires,
        link = c.link,
        project_url = c.project_url,
    );
    let html = html_of(&subject, &text, &[c.link, c.project_url], "");
    Rendered {
        subject,
        text,
        html,
    }
}

/// `trunkfarm mail test`.
pub(crate) fn test_mail(hub: &str) -> Rendered {
    let subject = "[trunkfarm] test mail".to_owned();
    let text =
        format!("This is a test mail from the trunkfarm hub {hub}: its [smtp] settings work.\n");
    let html = html_of(&subject, &text, &[], "");
    Rendered {
        subject,
        text,
        html,
    }
}

/// A culprit commit as a mail lists it: short hash, subject, author (the
/// last two written by whoever committed).
fn culprit(c: &Commit) -> String {
    format!(
        "{} {} ({})",
        short(&c.sha),
        untrusted(&c.subject),
        untrusted(&c.author)
    )
}

/// The HTML part: the text, escaped, in a pre block, where only `links`
/// (URLs the hub made) are clickable, each where it ends a line of the text
/// (as the hub writes them); nothing else in the text becomes a link.
fn html_of(subject: &str, text: &str, links: &[&str], unsubscribe_url: &str) -> String {
    let mut body = String::new();
    for line in text.lines() {
        let link = links
            .iter()
            .filter(|url| !url.is_empty())
            .find_map(|url| Some((line.strip_suffix(*url)?, *url)));
        match link {
            Some((before, url)) => {
                let url = escape(url);
                let _ = write!(body, "{}<a href=\"{url}\">{url}</a>", escape(before));
            }
            None => body.push_str(&escape(line)),
        }
        body.push('\n');
    }
    let footer = if unsubscribe_url.is_empty() {
        String::new()
    } else {
        format!(
            "<p style=\"font-size:small\"><a href=\"{}\">Unsubscribe</a></p>",
            escape(unsubscribe_url)
        )
    };
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title></head><body><pre style=\"font-family:monospace\">{body}</pre>{footer}</body></html>",
        escape(subject)
    )
}

/// Text someone else wrote, made safe to quote in a mail: terminal escape
/// sequences (CSI such as colours, OSC such as titles and `OSC 8`
/// hyperlinks, DCS and the like) and every other control character but
/// newline and tab removed, as are the bidirectional overrides that make
/// text read otherwise than it is and the invisible ones (zero-width spaces
/// and joiners, direction marks); then URLs defanged — `scheme://` becomes
/// `scheme[:]//`, `mailto:` `mailto[:]`, a `www.` that starts a word
/// `www[.]` and a bare host `phish.example[.]com` — so that a mail client
/// that turns plain text into links does not. What is left still reads the
/// same to a person.
pub(crate) fn untrusted(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => plain.push(c),
            '\u{1b}' => match chars.peek() {
                Some('[') => {
                    chars.next();
                    skip_csi(&mut chars);
                }
                Some(']' | 'P' | 'X' | '^' | '_') => {
                    chars.next();
                    skip_string(&mut chars);
                }
                // Other escapes: intermediate bytes, then one final byte
                // (a line break is not one: it stays).
                Some(_) => {
                    while chars
                        .next_if(|c| ('\u{20}'..='\u{2f}').contains(c))
                        .is_some()
                    {}
                    chars.next_if(|c| *c != '\n');
                }
                None => {}
            },
            '\u{9b}' => skip_csi(&mut chars),
            '\u{90}' | '\u{98}' | '\u{9d}' | '\u{9e}' | '\u{9f}' => skip_string(&mut chars),
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {}
            // Invisible characters that hide a link's real text: zero-width
            // spaces and joiners, direction marks, word joiner, BOM.
            '\u{200b}'..='\u{200f}' | '\u{2060}'..='\u{2064}' | '\u{feff}' | '\u{061c}' => {}
            c if c.is_control() => {}
            c => plain.push(c),
        }
    }
    defang(&plain)
}

/// Skips a CSI sequence's parameter and intermediate bytes and its final
/// byte (anything else ends it and stays).
fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while chars
        .next_if(|c| ('\u{20}'..='\u{3f}').contains(c))
        .is_some()
    {}
    chars.next_if(|c| ('\u{40}'..='\u{7e}').contains(c));
}

/// Skips an OSC, DCS, SOS, PM or APC string up to its terminator (BEL,
/// `ESC \\` or ST), or to the end of the line if it has none.
fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => return,
            '\u{7}' | '\u{9c}' => {
                chars.next();
                return;
            }
            '\u{1b}' => {
                chars.next();
                if chars.peek() == Some(&'\\') {
                    chars.next();
                }
                return;
            }
            _ => {
                chars.next();
            }
        }
    }
}

/// Top-level domains that mail clients turn into links on their own
/// (`example.com`), and that test output rarely ends a word with: file
/// names end in `.py`, `.rs`, `.md`, which are country domains too, and
/// stay as they are.
const LINKED_TLDS: &[&str] = &[
    "com", "net", "org", "info", "biz", "xyz", "top", "online", "site", "app", "io", "co", "me",
    "ly", "click", "link", "live", "shop",
];

/// Defangs URLs: `scheme://` → `scheme[:]//`, `mailto:` → `mailto[:]`, a
/// word-initial `www.` → `www[.]`, and a bare host a mail client would link
/// (`phish.example.com`, `evil.io/login`; any `host.tld/path` whose top
/// label is letters) gets its last dot as `[.]`.
fn defang(text: &str) -> String {
    let text = text.replace("://", "[:]//");
    let text = bracket_colon(&text, "mailto:");
    // ASCII lower-casing keeps every byte where it was.
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (i, _) in lower.match_indices("www.") {
        let starts_word = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        if starts_word {
            out.push_str(&text[done..i + 3]);
            out.push_str("[.]");
            done = i + 4;
        }
    }
    out.push_str(&text[done..]);
    defang_hosts(&out)
}

/// The colon ending `prefix` (in any ASCII case) as `[:]`, wherever it
/// occurs; the rest keeps its case.
fn bracket_colon(text: &str, prefix: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (i, _) in lower.match_indices(prefix) {
        let colon = i + prefix.len() - 1;
        out.push_str(&text[done..colon]);
        out.push_str("[:]");
        done = colon + 1;
    }
    out.push_str(&text[done..]);
    out
}

/// Each word that is a bare host a mail client would link gets its last
/// dot as `[.]` (see [`defang`]).
fn defang_hosts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word_start = None;
    let is_word = |c: char| c.is_alphanumeric() || "-._/~%?=&#+:@".contains(c);
    let flush = |out: &mut String, word: &str| match host_dot(word) {
        Some(dot) => {
            out.push_str(&word[..dot]);
            out.push_str("[.]");
            out.push_str(&word[dot + 1..]);
        }
        None => out.push_str(word),
    };
    for (i, c) in text.char_indices() {
        match (is_word(c), word_start) {
            (true, None) => word_start = Some(i),
            (false, Some(start)) => {
                flush(&mut out, &text[start..i]);
                word_start = None;
                out.push(c);
            }
            (false, None) => out.push(c),
            (true, Some(_)) => {}
        }
    }
    if let Some(start) = word_start {
        flush(&mut out, &text[start..]);
    }
    out
}

/// Where the last dot of `word`'s host is, when the word is a host a mail
/// client would link: `name.tld` with a linked TLD, or `name.tld/…` with
/// any alphabetic TLD; an address (`a@b.org`) is left alone.
fn host_dot(word: &str) -> Option<usize> {
    if word.contains('@') {
        return None;
    }
    let word = word.trim_end_matches(['.', ',', ':', ';', '?', '!']);
    let (host, path) = match word.find('/') {
        Some(slash) => (&word[..slash], true),
        None => (word, false),
    };
    let host = host.split(':').next().unwrap_or(host);
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return None;
    }
    let dot = host.rfind('.')?;
    let (name, tld) = (&host[..dot], &host[dot + 1..]);
    if name.is_empty() || name.ends_with('.') || !(2..=12).contains(&tld.len()) {
        return None;
    }
    if !tld.chars().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    let linked = LINKED_TLDS.contains(&tld.to_ascii_lowercase().as_str());
    (linked || path).then_some(dot)
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_hosts_mailto_and_invisible_characters_are_defanged() {
        for (raw, want) in [
            ("see phish.example.com now", "see phish.example[.]com now"),
            ("log in: evil.io/login?x=1.", "log in: evil[.]io/login?x=1."),
            ("go to Evil.Example/reset", "go to Evil[.]Example/reset"),
            ("(mirror.org)", "(mirror[.]org)"),
            ("MailTo:boss@corp.example", "MailTo[:]boss@corp.example"),
            // Hidden inside a word: removed, then the word is defanged.
            ("phish\u{200b}.com", "phish[.]com"),
            ("a\u{200d}b\u{200e}c\u{feff}", "abc"),
            // What test output is made of stays as it is.
            (
                "FAILED tests/test_x.py::test_upper",
                "FAILED tests/test_x.py::test_upper",
            ),
            (
                "textkit.test_upper os.path 0.5s e.g. README.md",
                "textkit.test_upper os.path 0.5s e.g. README.md",
            ),
            ("./run.sh ../lib.rs v1.2.3/", "./run.sh ../lib.rs v1.2.3/"),
            ("ada@example.org", "ada@example.org"),
        ] {
            assert_eq!(untrusted(raw), want, "{raw:?}");
        }
    }

    fn went_red() -> Transition {
        Transition {
            id: 7,
            kind: TransitionKind::WentRed.into(),
            project: "attrs".into(),
            upstream: "cpython".into(),
            platform: "linux-x86_64".into(),
            upstream_commit: "3f2a9c1e2b4d".repeat(3),
            last_green_upstream_commit: "1111111111".into(),
            culprits: vec![Commit {
                sha: "3f2a9c1e2b4d".repeat(3),
                subject: "gh-1: speed up <dict>".into(),
                author: "Ada <ada@example.org>".into(),
                time_ms: 0,
            }],
            newly_failing: vec!["tests.test_x".into()],
            job_id: 42,
            ..Default::default()
        }
    }

    static TAIL: std::sync::LazyLock<Quote> =
        std::sync::LazyLock::new(|| Quote::Tail("FAILED tests/test_x.py\n1 failed".into()));

    fn ctx<'a>() -> Context<'a> {
        Context {
            branch: "main",
            log: &TAIL,
            run: None,
            public_url: "https://farm.example.org",
            unsubscribe_url: "https://farm.example.org/unsubscribe?token=abc",
            reminder: None,
            follow_up: false,
        }
    }

    #[test]
    fn went_red_mail_says_everything() {
        let m = transition(&went_red(), &ctx());
        assert_eq!(
            m.subject,
            "[trunkfarm] attrs went red on linux-x86_64 with cpython main 3f2a9c1e2b"
        );
        for needle in [
            "gh-1: speed up <dict> (Ada <ada@example.org>)",
            "after the last green 1111111111",
            "Newly failing tests:\n  tests.test_x",
            "  | 1 failed",
            "https://farm.example.org/runs/42",
            "https://farm.example.org/projects/attrs",
            "Unsubscribe: https://farm.example.org/unsubscribe?token=abc",
            "did not change",
        ] {
            assert!(m.text.contains(needle), "{needle:?} not in\n{}", m.text);
        }
        assert!(m.html.contains("speed up &lt;dict&gt;"), "{}", m.html);
        assert!(!m.html.contains("<dict>"));
    }

    /// A hostile test suite's output: colours, an OSC 8 hyperlink, a window
    /// title, a bare phishing URL, HTML in a test name, a C1 CSI, a bidi
    /// override.
    const HOSTILE_LOG: &str = "\u{1b}[1;31mFAILED\u{1b}[0m tests/test_x.py\n\
        \u{1b}]8;;https://phish.example/login\u{7}click here\u{1b}]8;;\u{7} to fix\n\
        \u{1b}]0;pwned title\u{7}please log in at https://phish.example/login now\n\
        \u{9b}2Jsee www.phish.example \u{202e}txt.exe\u{8}\u{7}\r\n\u{1b}(Bend";

    #[test]
    fn untrusted_text_in_a_mail_is_plain_and_links_nowhere() {
        let mut t = went_red();
        t.newly_failing = vec![
            "tests.test_login <a href=\"https://phish.example/login\">reset your password</a>"
                .into(),
        ];
        t.culprits[0].subject = "fix \u{1b}[8mhidden\u{1b}[0m http://phish.example".into();
        let mut c = ctx();
        let hostile = Quote::Tail(HOSTILE_LOG.into());
        c.log = &hostile;
        let m = transition(&t, &c);
        let d = digest(
            "cpython",
            &[t],
            "https://farm.example.org",
            "https://farm.example.org/u",
        );
        for part in [&m.text, &m.html, &d.text, &d.html] {
            assert!(
                !part
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t'),
                "a control character in {part:?}"
            );
            assert!(!part.contains("://phish"), "a phishing URL in\n{part}");
            assert!(!part.contains('\u{202e}'));
        }
        for needle in [
            "  | FAILED tests/test_x.py",
            "  | click here to fix",
            "  | please log in at https[:]//phish.example/login now",
            "  | see www[.]phish.example txt.exe",
            "  | end",
            "tests.test_login <a href=\"https[:]//phish.example/login\">reset your password</a>",
            "fix hidden http[:]//phish.example",
        ] {
            assert!(m.text.contains(needle), "{needle:?} not in\n{}", m.text);
        }
        assert!(!m.text.contains("pwned title"), "{}", m.text);
        // In HTML, the only links are the hub's: run, history, unsubscribe
        // (in the text and the footer).
        let hrefs: Vec<&str> = m.html.split("<a href=\"").skip(1).collect();
        assert_eq!(hrefs.len(), 4, "{}", m.html);
        for href in hrefs {
            assert!(href.starts_with("https://farm.example.org/"), "{href}");
        }
        assert!(
            m.html
                .contains("&lt;a href=&quot;https[:]//phish.example/login&quot;&gt;"),
            "{}",
            m.html
        );
        assert_eq!(d.html.matches("<a href=").count(), 3, "{}", d.html);
    }

    #[test]
    fn a_found_bisection_names_the_first_bad_commit_and_the_class() {
        let mut t = went_red();
        let innocent = Commit {
            sha: "2".repeat(40),
            subject: "gh-2: innocent".into(),
            author: "Bo <bo@example.org>".into(),
            time_ms: 0,
        };
        t.culprits.insert(0, innocent);
        t.class = Some(Class::Regressed);
        t.bisect = Some(crate::results::Bisect {
            state: BisectState::Found,
            first_bad: Some(t.culprits[1].clone()),
            builds: 1,
            ..Default::default()
        });
        let m = transition(&t, &ctx());
        assert!(
            m.text.contains(
                "\nFirst bad commit: 3f2a9c1e2b gh-1: speed up <dict> (Ada <ada@example.org>)\n"
            ),
            "{}",
            m.text
        );
        assert!(m.text.contains("\nClass: regressed\n"), "{}", m.text);
        assert!(
            !m.text.contains("innocent"),
            "the others are not blamed: {}",
            m.text
        );
        // While it runs, the range is what is known; a range left is listed.
        t.bisect = Some(crate::results::Bisect::default());
        let m = transition(&t, &ctx());
        assert!(m.text.contains("Bisecting the 2 commits"), "{}", m.text);
        assert!(m.text.contains("innocent"), "{}", m.text);
        assert!(!m.text.contains("First bad commit"), "{}", m.text);
        t.bisect = Some(crate::results::Bisect {
            state: BisectState::Range,
            candidates: t.culprits.clone(),
            ..Default::default()
        });
        let m = transition(&t, &ctx());
        assert!(m.text.contains("narrowed it to 2 commits"), "{}", m.text);
        // Unclassed (older) transitions say no class.
        assert!(!transition(&went_red(), &ctx()).text.contains("Class:"));
    }

    #[test]
    fn the_failing_tests_messages_come_before_the_log() {
        let run = RunInfo {
            failing_tests: vec![TestCase {
                name: "tests.test_x".into(),
                status: 3,
                time_ms: 1,
                message: "AssertionError: 3 != 4".into(),
            }],
            ..Default::default()
        };
        let mut c = ctx();
        c.run = Some(&run);
        let m = transition(&went_red(), &c);
        let said = m
            .text
            .find("What the failing tests said:\n  tests.test_x\n    AssertionError: 3 != 4\n");
        let tail = m.text.find("Last lines of the log:");
        assert!(said.is_some() && said < tail, "{}", m.text);
        let excerpt = Quote::Excerpt("[fail] test_x".into());
        c.log = &excerpt;
        let m = transition(&went_red(), &c);
        assert!(
            m.text
                .contains("From the log, around the first failures:\n  | [fail] test_x\n"),
            "{}",
            m.text
        );
        // A suspicious green says its counts against the usual ones.
        let mut t = went_red();
        t.class = Some(Class::Suspicious);
        t.suspicious = "20 passed → 0 passed, 20 skipped".into();
        let m = transition(&t, &c);
        assert!(
            m.text.contains("Class: suspicious\n")
                && m.text.contains("  20 passed → 0 passed, 20 skipped"),
            "{}",
            m.text
        );
    }

    #[test]
    fn fixed_reminder_build_and_digest() {
        let mut t = went_red();
        t.kind = TransitionKind::Fixed.into();
        let m = transition(&t, &ctx());
        assert!(
            m.subject.contains("attrs fixed on linux-x86_64"),
            "{}",
            m.subject
        );
        assert!(!m.text.contains("Culprit"));
        let mut c = ctx();
        c.reminder = Some((7, 1));
        let m = transition(&went_red(), &c);
        assert!(
            m.subject.contains("attrs still red (7 days)"),
            "{}",
            m.subject
        );
        let mut b = went_red();
        b.project.clear();
        let m = transition(&b, &ctx());
        assert_eq!(
            m.subject,
            "[trunkfarm] cpython main build failed on linux-x86_64 at 3f2a9c1e2b"
        );
        let d = digest("cpython", &[went_red()], "https://x", "https://x/u");
        assert!(d.subject.contains("1 project(s) went red"));
        assert!(d.text.contains("- attrs on linux-x86_64"));
    }

    #[test]
    fn a_suspicious_green_says_the_counts_and_the_commits_not_the_log() {
        let mut t = went_red();
        t.kind = TransitionKind::StillGreen.into();
        t.class = Some(Class::Suspicious);
        t.suspicious = "20 passed → 0 passed, 20 skipped".into();
        let hostile = Quote::Tail(HOSTILE_LOG.to_owned());
        let mut c = ctx();
        c.log = &hostile;
        let m = transition(&t, &c);
        assert_eq!(
            m.subject,
            "[trunkfarm] attrs looks suspicious on linux-x86_64 with cpython main 3f2a9c1e2b: 20 passed → 0 passed, 20 skipped"
        );
        for needle in [
            "  20 passed → 0 passed, 20 skipped",
            "Upstream commits since the last usual run 1111111111 (1):",
            "  3f2a9c1e2b gh-1: speed up <dict> (Ada <ada@example.org>)",
            "You get one mail per suspicious spell",
            "The run:     https://farm.example.org/runs/42",
            "Unsubscribe: ",
        ] {
            assert!(m.text.contains(needle), "{needle:?} not in\n{}", m.text);
        }
        assert!(!m.text.contains("FAILED tests"), "no log tail: {}", m.text);
        assert!(m.html.contains("speed up &lt;dict&gt;"), "{}", m.html);
    }
}
