//! Self-service subscription end to end: a real hub whose project page form
//! is POSTed over HTTP, a real SMTP server receiving the confirmation mail,
//! the CLI listing what is subscribed, and a real went-red mail whose
//! unsubscribe page names the address and the project.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use trunkfarm_e2e::farm::{Repos, SHOUTER_MAINTAINER, smtp_toml, wait_run};
use trunkfarm_e2e::smtp::{Mail, SmtpSink};
use trunkfarm_e2e::{Agent, Hub};

/// How long the pipeline may take for one step (build + fan-out + tests).
const STEP: Duration = Duration::from_secs(90);

/// How long a confirmation link works in this test.
const LINK_TTL: Duration = Duration::from_secs(12);

const BOB: &str = "bob@example.org";
const CAROL: &str = "carol@example.org";

/// The web endpoint's address, from `hub.json`.
fn web_addr(hub: &Hub) -> SocketAddr {
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(hub.data_dir.join("hub.json")).unwrap())
            .unwrap();
    info["web"].as_str().unwrap().parse().unwrap()
}

/// One HTTP/1.1 request; the status and the whole response.
fn http(addr: SocketAddr, method: &str, path: &str, form: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

/// The path and query of a link the hub mailed.
fn path_of(link: &str) -> String {
    let rest = link.strip_prefix("http://").expect("an http link");
    rest[rest.find('/').unwrap()..].to_string()
}

/// Asks for a subscription of `address` to `project` on its page's form.
fn ask(web: SocketAddr, project: &str, address: &str) -> (u16, String) {
    let form = format!("address={}", address.replace('@', "%40").replace(' ', "+"));
    http(
        web,
        "POST",
        &format!("/projects/{project}/subscribe"),
        &form,
    )
}

/// Who is subscribed to shouter, per `trunkfarm subscriptions --json`.
fn subscribers(hub: &Hub) -> Vec<String> {
    let subs = hub.cli_json(&["subscriptions", "--json"]);
    let mut out: Vec<String> = subs
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["project"] == "shouter")
        .map(|s| s["email"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

/// The confirmation link in `mail`'s text.
fn confirm_link(mail: &Mail) -> String {
    mail.text
        .lines()
        .map(str::trim)
        .find(|l| l.contains("/subscribe/confirm?token="))
        .unwrap_or_else(|| panic!("no confirmation link in {}", mail.text))
        .to_string()
}

fn mail_to<'a>(mails: &'a [Mail], to: &str, subject: &str) -> &'a Mail {
    mails
        .iter()
        .find(|m| m.to().iter().any(|t| t == to) && m.subject().contains(subject))
        .unwrap_or_else(|| panic!("no mail to {to} about {subject:?}"))
}

#[test]
fn a_confirmation_link_subscribes_only_when_followed_by_a_post() {
    let sink = SmtpSink::start();
    let repos = Repos::with(&["shouter"]);
    let c1 = repos.head("rt");
    let extra = format!(
        "{}subscribe_link_ttl = \"{}s\"\n",
        smtp_toml(&sink),
        LINK_TTL.as_secs()
    );
    let hub = Hub::start_with(&repos.config(&extra), &[]);
    let mut agent = Agent::enroll(&hub, "p0", &["--trusted"]);
    agent.start(&[]);
    hub.wait_agents_connected(1);
    let web = web_addr(&hub);

    // The form: bob and carol ask; shouter's maintainer, subscribed by the
    // config, gets the same answer (nobody learns who is subscribed).
    let asked = Instant::now();
    for address in [BOB, CAROL, SHOUTER_MAINTAINER] {
        let (code, body) = ask(web, "shouter", address);
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains(&format!(
                "We sent a link to {address}; nothing is subscribed until you follow it."
            )),
            "{body}"
        );
    }
    let (code, body) = ask(web, "nope", BOB);
    assert_eq!(code, 404, "{body}");
    assert!(!body.contains("shouter"), "names no project: {body}");
    let (code, body) = ask(web, "shouter", "bob.example.org");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("has no @"), "{body}");

    // The mails arrive; nothing is subscribed yet.
    let mails = sink.wait_for_messages(3, STEP);
    let subject = "confirm your subscription to shouter";
    let bob_link = confirm_link(mail_to(&mails, BOB, subject));
    let carol_link = confirm_link(mail_to(&mails, CAROL, subject));
    assert!(
        bob_link.starts_with(&format!("http://{web}/subscribe/confirm?token=")),
        "{bob_link}"
    );
    assert_eq!(subscribers(&hub), [SHOUTER_MAINTAINER]);

    // GET (what a mail scanner does) shows the address, the project and a
    // button, and subscribes nothing.
    let (code, page) = http(web, "GET", &path_of(&bob_link), "");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("mail bob@example.org when shouter goes red"),
        "{page}"
    );
    assert!(
        page.contains("<button type=\"submit\">Subscribe</button>"),
        "{page}"
    );
    assert_eq!(subscribers(&hub), [SHOUTER_MAINTAINER]);

    // POST subscribes, once however often.
    for _ in 0..2 {
        let (code, page) = http(web, "POST", &path_of(&bob_link), "");
        assert_eq!(code, 200, "{page}");
        assert!(
            page.contains("bob@example.org is subscribed to shouter"),
            "{page}"
        );
    }
    assert_eq!(subscribers(&hub), [BOB, SHOUTER_MAINTAINER]);
    assert!(
        asked.elapsed() < LINK_TTL,
        "the machine was too slow to follow the link within its {LINK_TTL:?}"
    );

    // One byte changed: refused.
    let mut forged = path_of(&carol_link).into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    for method in ["GET", "POST"] {
        let (code, page) = http(web, method, &forged, "");
        assert_eq!(code, 400, "{page}");
        assert!(page.contains("This confirmation link is invalid"), "{page}");
    }

    // Carol's link, once expired, is refused and points at the project page.
    std::thread::sleep(LINK_TTL.saturating_sub(asked.elapsed()) + Duration::from_secs(1));
    for method in ["GET", "POST"] {
        let (code, page) = http(web, method, &path_of(&carol_link), "");
        assert_eq!(code, 410, "{page}");
        assert!(page.contains("This link expired on "), "{page}");
        assert!(
            page.contains("subscribe again on shouter&#39;s page"),
            "{page}"
        );
        assert!(page.contains("<a href=\"/projects/shouter\">"), "{page}");
    }
    assert_eq!(subscribers(&hub), [BOB, SHOUTER_MAINTAINER]);

    // Bob now hears when shouter goes red, and its unsubscribe page names
    // him and shouter without unsubscribing him.
    wait_run(&hub, "shouter", &c1, "green", STEP);
    let c2 = repos.break_upper("Eve Breaker <eve@example.org>");
    wait_run(&hub, "shouter", &c2, "red", STEP);
    let mails = sink.wait_for_messages(5, STEP);
    let red = mail_to(&mails, BOB, "shouter went red");
    let unsubscribe = red
        .header("List-Unsubscribe")
        .unwrap()
        .trim_matches(|c| c == '<' || c == '>')
        .to_string();
    let (code, page) = http(web, "GET", &path_of(&unsubscribe), "");
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("Press the button to stop mailing bob@example.org about shouter."),
        "{page}"
    );
    assert_eq!(subscribers(&hub), [BOB, SHOUTER_MAINTAINER]);
    let (code, page) = http(
        web,
        "POST",
        &path_of(&unsubscribe),
        "List-Unsubscribe=One-Click",
    );
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("bob@example.org will no longer receive mail about shouter"),
        "{page}"
    );
    assert_eq!(subscribers(&hub), [SHOUTER_MAINTAINER]);

    // Three confirmation mails per address and hour: carol had one.
    for _ in 0..2 {
        assert_eq!(ask(web, "shouter", CAROL).0, 200);
    }
    let (code, page) = ask(web, "shouter", CAROL);
    assert_eq!(code, 429, "{page}");
    // About 20 minutes (one mail refills every 20), less what has passed.
    let retry_after: u64 = page
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {page}"));
    assert!((15 * 60..=20 * 60).contains(&retry_after), "{page}");
    assert!(
        page.contains("Too many confirmation mails went to this address lately; try again in "),
        "{page}"
    );
}
