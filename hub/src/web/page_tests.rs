//! The project, upstream and agent pages and their API over a real store:
//! the pipeline's in-process [`Farm`] drives a real story (green, a flaky
//! red, a push that breaks a project and is bisected, a build no agent
//! takes), then the hub's own router answers each page and each API route,
//! and every fact a page shows (its `data-` attributes) is compared with
//! what the API says.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;
use tower::ServiceExt as _;
use trunkfarm_proto::v1::{Capabilities, Outcome, ReportFile};

use crate::job_key::JobKey;
use crate::pipeline::tests::{
    CONFIG, Farm, RT, SHOUTER, bisect_config, green_trunk, is_baseline, junit, shouter_red,
};

/// The hub's router over the farm's owners.
fn app(f: &Farm) -> axum::Router {
    super::test_router(f.site())
}

/// GET `path`: status, content type and body.
async fn get(app: &axum::Router, path: &str) -> (StatusCode, String, String) {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, kind, String::from_utf8(body.to_vec()).unwrap())
}

/// The page at `path` (200, HTML).
async fn page(app: &axum::Router, path: &str) -> String {
    let (status, kind, body) = get(app, path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    assert!(kind.starts_with("text/html"), "{path}: {kind}");
    body
}

/// The API answer at `path` (200, JSON).
async fn api(app: &axum::Router, path: &str) -> Value {
    let (status, kind, body) = get(app, path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    assert_eq!(kind, "application/json", "{path}");
    serde_json::from_str(&body).unwrap()
}

/// Every value of attribute `name` in the page, in document order,
/// unescaped.
fn attrs(html: &str, name: &str) -> Vec<String> {
    let needle = format!(" {name}=\"");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find(&needle) {
        rest = &rest[at + needle.len()..];
        let end = rest.find('"').expect("a closed attribute");
        out.push(unescape(&rest[..end]));
        rest = &rest[end..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&#x2f;", "/")
        .replace("&#60;", "<")
        .replace("&#62;", ">")
        .replace("&#34;", "\"")
        .replace("&amp;", "&")
        .replace("&#38;", "&")
}

/// `items[*][key]` as strings (numbers written as the page writes them).
fn each(items: &Value, key: &str) -> Vec<String> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {items}"))
        .iter()
        .map(|v| text(&v[key]))
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Every element of every `items[*][key]` list.
fn flat(items: &Value, key: &str) -> Vec<Value> {
    items
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v[key].as_array().unwrap().clone())
        .collect()
}

/// Shouter's runs fail its `lower` test against `bad`; every other run
/// passes (the baseline too), every build passes.
fn breaks_at(bad: &str, k: &JobKey) -> (Outcome, Vec<ReportFile>) {
    if is_baseline(k) {
        return (Outcome::Passed, junit("upper", false));
    }
    match k.base() {
        JobKey::Test {
            project,
            upstream_commit,
            ..
        } if project == "shouter" && upstream_commit == bad => {
            (Outcome::Failed, junit("lower", true))
        }
        _ => (Outcome::Passed, junit("upper", false)),
    }
}

/// The story: c1 green; c2 a red of shouter's `upper` that passes on its
/// re-runs (flaky, and with `flaky_after = 1` known flaky); a push of
/// three commits whose head breaks shouter's `lower` test, classed
/// regressed and bisected (the bisection is left running); the farm and
/// the pushed commits.
async fn story() -> (Farm, Vec<String>) {
    let config = bisect_config(12).replace(
        "url = \"fake:shouter\"",
        "url = \"fake:shouter\"\nflaky_after = 1",
    );
    let mut f = Farm::with_config(&config).await;
    green_trunk(&mut f).await;
    f.trusted_tests_a_new_commit(shouter_red).await;
    f.run_jobs(|_| (Outcome::Passed, junit("upper", false)))
        .await;
    f.take_in().await;
    let push: Vec<String> = (0..3).map(|_| f.git.commit(RT)).collect();
    let bad = push[2].clone();
    f.poll_upstream(0).await;
    // Builds, tests (shouter's red held), its re-runs (regressed).
    for _ in 0..3 {
        f.run_jobs(|k| breaks_at(&bad, k)).await;
        f.take_in().await;
    }
    (f, push)
}

/// Runs the bisection's jobs until none is left.
async fn finish_bisection(f: &mut Farm, bad: &str) {
    loop {
        let jobs = f.assigned();
        if jobs.is_empty() {
            return;
        }
        for (job, _, key) in jobs {
            let (outcome, reports) = breaks_at(bad, &key);
            f.finish(job, &key, outcome, reports).await;
        }
        f.take_in().await;
    }
}

#[tokio::test]
async fn the_project_page_and_its_api_show_the_same_history() {
    let (mut f, push) = story().await;
    let bad = push[2].clone();
    finish_bisection(&mut f, &bad).await;
    // A new project commit no agent takes: its run waits, saying why.
    f.dispatch.set_quarantined("a", true).await.unwrap();
    f.git.commit(SHOUTER);
    f.poll_project(1).await;
    // Pages read stored records only: git failing changes nothing.
    f.git.broken.lock().unwrap().insert(SHOUTER.to_owned());
    f.git.broken.lock().unwrap().insert(RT.to_owned());
    let app = app(&f);

    let json = api(&app, "/api/v1/projects/shouter").await;
    let html = page(&app, "/projects/shouter").await;
    assert_eq!(json["name"], "shouter");
    assert_eq!(json["url"], SHOUTER);
    assert_eq!(attrs(&html, "data-url"), [SHOUTER]);
    assert_eq!(attrs(&html, "data-branch"), [text(&json["branch"])]);
    let series = &json["series"];
    assert_eq!(
        attrs(&html, "data-series"),
        series
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{}/{}", text(&s["upstream"]), text(&s["platform"])))
            .collect::<Vec<_>>()
    );
    assert_eq!(attrs(&html, "data-series"), ["rt/linux"]);
    let s = &series[0];
    // Red since the push's head, newly failing `lower`; its next run queued.
    assert_eq!(s["state"], "red");
    assert_eq!(attrs(&html, "data-state"), each(series, "state"));
    assert_eq!(s["pending"], "queued");
    assert_eq!(attrs(&html, "data-pending"), each(series, "pending"));
    assert!(!text(&s["waiting"]).is_empty(), "{s}");
    assert!(html.contains(&html_escaped(&text(&s["waiting"]))));
    assert!(s["red_since"].as_u64().unwrap() > 0);
    assert_eq!(attrs(&html, "data-red-since"), each(series, "red_since"));
    assert_eq!(s["went_red"]["class"], "regressed");
    assert_eq!(s["went_red"]["first_bad"]["sha"], bad.as_str());
    assert_eq!(s["went_red"]["bisect"], "found");
    assert_eq!(s["newly_failing"], serde_json::json!(["s.lower"]));
    assert_eq!(attrs(&html, "data-test"), ["s.lower"]);
    // The history, newest first, each linking its run.
    let history = &s["history"];
    let jobs = each(history, "job_id");
    assert!(jobs.len() >= 3, "{history}");
    assert_eq!(attrs(&html, "data-job"), jobs);
    assert_eq!(attrs(&html, "data-status"), each(history, "status"));
    for job in &jobs {
        assert!(html.contains(&format!("href=\"/runs/{job}\"")), "{job}");
    }
    let mut sorted = jobs.clone();
    sorted.sort_by_key(|j| std::cmp::Reverse(j.parse::<u64>().unwrap()));
    assert_eq!(jobs, sorted, "newest first");
    assert_eq!(history[0]["upstream_commit"], bad.as_str());
    assert_eq!(history[0]["status"], "red");
    // Transitions marked: the went red, and the flaky red before it.
    let marked: Vec<String> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| !r["transition"].is_null())
        .map(|r| text(&r["transition"]["kind"]))
        .collect();
    assert_eq!(attrs(&html, "data-transition"), marked);
    assert_eq!(marked, ["went_red", "still_green"]);
    let flaky_red = history
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["transition"]["class"] == "flaky")
        .expect("the flaky red is marked");
    assert_eq!(flaky_red["status"], "flaky", "the grid's word for it");
    // Its known flaky test.
    assert_eq!(each(&json["flaky_tests"], "name"), ["s.upper"]);
    assert_eq!(attrs(&html, "data-flaky"), ["s.upper"]);
    assert_eq!(json["flaky_tests"][0]["flips"], 1);
    // The subscription form, posting to the project.
    assert!(html.contains("action=\"/projects/shouter/subscribe\""));
    // Times as RFC 3339 beside every `_ms`.
    assert!(text(&history[0]["finished_at"]).ends_with('Z'));

    // The list: every configured project with its series' states.
    let all = api(&app, "/api/v1/projects").await;
    let html = page(&app, "/projects").await;
    let projects = &all["projects"];
    assert_eq!(each(projects, "name"), ["adder", "shouter"]);
    assert_eq!(attrs(&html, "data-project"), each(projects, "name"));
    let states = flat(projects, "series");
    assert_eq!(
        attrs(&html, "data-state"),
        states.iter().map(|s| text(&s["state"])).collect::<Vec<_>>()
    );
    let shouter = &projects[1]["series"][0];
    assert_eq!(
        (text(&shouter["state"]), text(&shouter["pending"])),
        ("red".into(), "queued".into())
    );
    assert_eq!(projects[1]["flaky_tests"], 1);
    assert_eq!(projects[0]["series"][0]["state"], "green");
}

#[tokio::test]
async fn the_upstream_page_and_its_api_show_builds_breakage_and_bisections() {
    let (mut f, push) = story().await;
    let bad = push[2].clone();
    f.git.broken.lock().unwrap().insert(RT.to_owned());
    let app = app(&f);
    // The bisection is under way.
    let json = api(&app, "/api/v1/upstreams/rt").await;
    let html = page(&app, "/upstreams/rt").await;
    let bisections = &json["bisections"];
    assert_eq!(bisections.as_array().unwrap().len(), 1, "{json}");
    let b = &bisections[0];
    assert_eq!(b["bad"], bad.as_str());
    // From the last green (c1; c2's red was flaky) to the push's head.
    assert_eq!(b["commits"], 4);
    assert_eq!(
        attrs(&html, "data-bisection"),
        [format!(
            "{}/{}/{}",
            text(&b["platform"]),
            text(&b["good"]),
            text(&b["bad"])
        )]
    );
    assert_eq!(
        attrs(&html, "data-builds-made"),
        each(bisections, "builds_made")
    );
    let members = &b["members"];
    assert_eq!(each(members, "project"), ["shouter"]);
    assert_eq!(attrs(&html, "data-member"), ["shouter"]);
    let narrowed = members[0]["narrowed_to"].as_array().unwrap().len();
    assert!((1..=4).contains(&narrowed), "{members}");
    assert_eq!(attrs(&html, "data-narrowed"), [narrowed.to_string()]);
    assert!(f.git.broken.lock().unwrap().remove(RT));
    finish_bisection(&mut f, &bad).await;

    // Done: the head broke shouter, and its bisection blamed the head.
    // A new head no agent builds: queued, saying why.
    f.dispatch.set_quarantined("a", true).await.unwrap();
    let next = f.git.commit(RT);
    f.poll_upstream(0).await;
    f.git.broken.lock().unwrap().insert(RT.to_owned());
    let json = api(&app, "/api/v1/upstreams/rt").await;
    let html = page(&app, "/upstreams/rt").await;
    assert!(json["bisections"].as_array().unwrap().is_empty());
    assert!(attrs(&html, "data-bisection").is_empty());
    let commits = &json["commits"];
    let shas = each(commits, "sha");
    assert_eq!(attrs(&html, "data-commit"), shas);
    // Heads only, newest first: c1, c2, the push's head, the new one.
    assert_eq!(shas.len(), 4, "{shas:?}");
    assert_eq!(shas[0], next);
    assert_eq!(shas[1], bad);
    assert!(!shas.contains(&push[0]) && !shas.contains(&push[1]));
    let builds = flat(commits, "builds");
    assert_eq!(
        attrs(&html, "data-build"),
        builds.iter().map(|b| text(&b["state"])).collect::<Vec<_>>()
    );
    let newest = &commits[0]["builds"][0];
    assert_eq!(newest["state"], "queued");
    assert!(!text(&newest["waiting"]).is_empty());
    assert!(html.contains(&html_escaped(&text(&newest["waiting"]))));
    assert_eq!(commits[1]["builds"][0]["state"], "passed");
    assert_eq!(attrs(&html, "data-broke"), each_len(commits, "broke"));
    assert_eq!(attrs(&html, "data-blamed"), each_len(commits, "blamed"));
    assert_eq!(each(&commits[1]["broke"], "project"), ["shouter"]);
    assert_eq!(each(&commits[1]["blamed"], "project"), ["shouter"]);
    assert_eq!(commits[1]["broke"][0]["first_bad"]["sha"], bad.as_str());
    assert!(
        !text(&commits[1]["subject"]).is_empty(),
        "the culprit range names it"
    );
    // The flaky red's commit broke nothing.
    assert!(commits[2]["broke"].as_array().unwrap().is_empty());

    // The list.
    let all = api(&app, "/api/v1/upstreams").await;
    let html = page(&app, "/upstreams").await;
    let upstreams = &all["upstreams"];
    assert_eq!(each(upstreams, "name"), ["rt"]);
    assert_eq!(attrs(&html, "data-upstream"), ["rt"]);
    assert_eq!(attrs(&html, "data-head"), [next.as_str()]);
    assert_eq!(upstreams[0]["head"], next.as_str());
    assert_eq!(
        attrs(&html, "data-build"),
        each(&upstreams[0]["head_builds"], "state")
    );
    assert_eq!(upstreams[0]["head_builds"][0]["state"], "queued");
}

fn each_len(items: &Value, key: &str) -> Vec<String> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[key].as_array().unwrap().len().to_string())
        .collect()
}

#[tokio::test]
async fn unknown_projects_and_upstreams_are_404_naming_the_configured_ones() {
    let f = Farm::with_config(CONFIG).await;
    let app = app(&f);
    for (path, names) in [
        ("/projects/nope", "adder, shouter"),
        ("/upstreams/nope", "rt"),
    ] {
        let (status, kind, body) = get(&app, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(kind.starts_with("text/html"));
        assert!(body.contains(names), "{path}: {body}");
        let (status, kind, body) = get(&app, &format!("/api/v1{path}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(kind, "application/json");
        let error: Value = serde_json::from_str(&body).unwrap();
        assert!(text(&error["error"]).contains(names), "{body}");
    }
    // A hostile name is escaped.
    let (status, _, body) = get(&app, "/projects/%3Cscript%3E").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!body.contains("<script>"), "{body}");
    // Before anything ran: pages say so.
    let html = page(&app, "/upstreams/rt").await;
    assert!(html.contains("Polling has not seen a head yet."));
    let json = api(&app, "/api/v1/projects/adder").await;
    assert_eq!(json["series"][0]["state"], "none");
}

#[tokio::test]
async fn the_agents_page_and_its_api_count_jobs_done_and_show_the_donors_limits() {
    let mut f = Farm::with_config(CONFIG).await;
    let donor = f.join("donor", true).await;
    // A donor limiting its machine: 2 jobs at once, 30m each, adder only,
    // 4 cores and 8 GiB, never beta, at night, when idle.
    let limited = f.enroll("limited", Default::default()).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let caps = Capabilities {
        max_parallel_jobs: 2,
        max_job_timeout_secs: 1800,
        allowed_projects: vec!["adder".into()],
        denied_projects: vec!["beta".into()],
        cores: 4,
        memory_bytes: 8 << 30,
        schedule: "Mon-Fri 22:00-07:00 (Europe/Berlin)".into(),
        only_when_idle: "load under 2.0".into(),
        cache_bytes: 10 << 30,
        ..Default::default()
    };
    let hello = crate::dispatch::Hello {
        name: "limited".into(),
        caps,
        labels: ["linux".to_string()].into_iter().collect(),
        trusted: false,
        // Takes no job: the donor does them all.
        quarantined: true,
        max_parallel: 2,
        draining: false,
        agent_version: "test".into(),
        remote: "192.0.2.7:4242".into(),
        paused: None,
        offered: None,
        tx,
    };
    f.dispatch.connect(&limited, &[], hello).await.unwrap();
    // Only the donor works: two builds, three runs.
    f.only(&donor).await;
    green_trunk(&mut f).await;
    let app = app(&f);
    let json = api(&app, "/api/v1/agents").await;
    let html = page(&app, "/agents").await;
    let agents = &json["agents"];
    assert_eq!(attrs(&html, "data-agent"), each(agents, "name"));
    assert_eq!(attrs(&html, "data-jobs-done"), each(agents, "jobs_done"));
    assert_eq!(
        attrs(&html, "data-max-parallel"),
        each(agents, "max_parallel_jobs")
    );
    assert_eq!(attrs(&html, "data-status"), each(agents, "status"));
    let limits: Vec<String> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let words: Vec<&str> = a["limits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap())
                .collect();
            words.join("; ")
        })
        .collect();
    assert_eq!(attrs(&html, "data-limits"), limits);
    let find = |name: &str| {
        agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap()
            .clone()
    };
    let d = find("donor");
    assert_eq!(d["jobs_done"], 5, "{d}");
    let l = find("limited");
    assert_eq!(l["jobs_done"], 0);
    assert_eq!(l["max_parallel_jobs"], 2);
    assert_eq!(l["max_job_timeout_secs"], 1800);
    assert_eq!(l["allowed_projects"], serde_json::json!(["adder"]));
    assert!(html.contains("jobs up to 30m"), "{html}");
    assert!(html.contains("only adder"));
    assert_eq!(l["denied_projects"], serde_json::json!(["beta"]));
    assert_eq!(l["cores"], 4);
    assert_eq!(l["memory_bytes"], 8u64 << 30);
    assert_eq!(l["schedule"], "Mon-Fri 22:00-07:00 (Europe/Berlin)");
    assert_eq!(l["only_when_idle"], "load under 2.0");
    assert_eq!(l["cache_bytes"], 10u64 << 30);
    for words in [
        "4 cores",
        "8.0 GiB",
        "not beta",
        "Mon-Fri 22:00-07:00 (Europe/Berlin)",
        "when idle: load under 2.0",
        "cache 10.0 GiB",
    ] {
        assert!(html.contains(words), "{words}: {html}");
    }
    // Never an address or an agent's id (its credential's name).
    for body in [html.as_str(), &json.to_string()] {
        assert!(!body.contains("192.0.2.7"), "{body}");
        assert!(!body.contains(&limited), "{body}");
    }
}

/// `text` as askama's HTML escaper writes it (how a page shows it).
fn html_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&#38;"),
            '<' => out.push_str("&#60;"),
            '>' => out.push_str("&#62;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// POSTs `body` as a form to `path` with `headers`: status and body.
async fn post_form(
    app: &axum::Router,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String) {
    let mut request = Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("host", "farm.internal:8080");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn subscription_forms_posted_from_another_site_are_refused() {
    let f = Farm::with_config(CONFIG).await;
    let app = app(&f);
    // The farm's notify.public_url is http://hub.test; the request's Host
    // is farm.internal:8080 (a proxy's view).
    let cross = [
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        // Host's name under another port is another origin.
        vec![("origin", "http://farm.internal")],
        vec![("sec-fetch-site", "cross-site")],
    ];
    let own = [
        vec![],
        vec![("origin", "http://farm.internal:8080")],
        vec![("origin", "http://HUB.test")],
        vec![("sec-fetch-site", "same-origin")],
        vec![
            ("origin", "http://hub.test"),
            ("sec-fetch-site", "same-origin"),
        ],
    ];
    for (i, headers) in cross.iter().enumerate() {
        let body = format!("address=cross{i}%40example.org");
        let (status, html) = post_form(&app, "/projects/shouter/subscribe", headers, &body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}: {html}");
        assert!(
            html.contains("This form was sent from another website"),
            "{html}"
        );
        let (status, html) = post_form(&app, "/subscribe/confirm?token=abc", headers, "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}: {html}");
        // The one-click exemption is for /unsubscribe only.
        let (status, _) = post_form(
            &app,
            "/subscribe/confirm?token=abc",
            headers,
            "List-Unsubscribe=One-Click",
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}");
    }
    for (i, headers) in own.iter().enumerate() {
        let body = format!("address=own{i}%40example.org");
        let (status, html) = post_form(&app, "/projects/shouter/subscribe", headers, &body).await;
        assert_eq!(status, StatusCode::OK, "{headers:?}: {html}");
        assert!(html.contains("We sent a link to own"), "{html}");
        // Past the check, the notifier judges the token.
        let (status, html) = post_form(&app, "/subscribe/confirm?token=abc", headers, "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{headers:?}: {html}");
        assert!(html.contains("confirmation link is invalid"), "{html}");
    }
}

#[tokio::test]
async fn unsubscribe_posts_from_another_site_are_refused_unless_one_click() {
    let f = Farm::with_config(CONFIG).await;
    let app = app(&f);
    let evil = [("origin", "https://evil.example")];
    // A form-style POST from another site: refused before the token is read.
    let (status, html) = post_form(&app, "/unsubscribe?token=abc", &evil, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{html}");
    let (status, _) = post_form(
        &app,
        "/unsubscribe?token=abc",
        &[("sec-fetch-site", "cross-site")],
        "x=1",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // RFC 8058's one-click body passes from anywhere, URL-encoded or
    // multipart, and so do requests from the hub's pages or without any
    // origin: the token decides (here the test router's, which refuses).
    let multipart = "--b\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--b--\r\n";
    for (headers, body) in [
        (&evil[..], "List-Unsubscribe=One-Click"),
        (&evil[..], multipart),
        (&[][..], ""),
        (&[("origin", "http://hub.test")][..], ""),
    ] {
        let (status, html) = post_form(&app, "/unsubscribe?token=abc", headers, body).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{headers:?} {body:?}: {html}"
        );
        assert!(html.contains("not here"), "{html}");
    }
}

/// The grid's cell of `project` (or of the upstream's builds: `None`) at
/// `commit` on linux, from `/api/v1/status`.
fn status_cell(status: &Value, project: Option<&str>, commit: &str) -> Value {
    let u = &status["upstreams"][0];
    let cells = match project {
        Some(name) => u["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["cells"].clone())
            .unwrap(),
        None => u["commits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["sha"] == commit)
            .map(|c| c["builds"].clone())
            .unwrap(),
    };
    cells
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["commit"] == commit && c["platform"] == "linux")
        .cloned()
        .unwrap_or_else(|| panic!("no cell at {commit}: {status}"))
}

/// The class of the grid cell at `commit` in the first row whose header
/// starts with `row` (`<a href="/projects/NAME"` or `rt build`).
fn grid_cell_class(html: &str, row: &str, commit: &str) -> String {
    let at = html.find(row).unwrap_or_else(|| panic!("no row {row}"));
    let rest = &html[at..];
    let rest = &rest[..rest.find("</tr>").unwrap()];
    let cell = rest
        .find(&format!("data-commit=\"{commit}\""))
        .unwrap_or_else(|| panic!("no cell at {commit} in {rest}"));
    let open = rest[..cell].rfind("class=\"cell ").unwrap() + "class=\"cell ".len();
    rest[open..open + rest[open..].find('"').unwrap()].to_owned()
}

#[tokio::test]
async fn a_flaky_red_reads_flaky_on_the_grid_the_project_page_and_both_apis() {
    let (f, push) = story().await;
    let app = app(&f);
    let project = api(&app, "/api/v1/projects/shouter").await;
    let project_html = page(&app, "/projects/shouter").await;
    let history = &project["series"][0]["history"];
    let flaky = history
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["transition"]["class"] == "flaky")
        .expect("the flaky red is marked");
    assert_eq!(flaky["status"], "flaky");
    let job = text(&flaky["job_id"]);
    let at = attrs(&project_html, "data-job")
        .iter()
        .position(|j| *j == job)
        .unwrap();
    assert_eq!(attrs(&project_html, "data-status")[at], "flaky");
    // The grid's cell of that run says the same.
    let commit = text(&flaky["upstream_commit"]);
    let status = api(&app, "/api/v1/status").await;
    let cell = status_cell(&status, Some("shouter"), &commit);
    assert_eq!(
        (text(&cell["job_id"]), text(&cell["state"])),
        (job, "flaky".into())
    );
    let grid = page(&app, "/").await;
    assert_eq!(
        grid_cell_class(&grid, "<a href=\"/projects/shouter\"", &commit),
        "flaky"
    );
    // The push's red, its culprit range being bisected: `bisecting` on
    // the grid, the project page, the project list and their APIs.
    let bad = &push[2];
    let cell = status_cell(&status, Some("shouter"), bad);
    assert_eq!(cell["state"], "bisecting", "{cell}");
    assert_eq!(
        grid_cell_class(&grid, "<a href=\"/projects/shouter\"", bad),
        "bisecting"
    );
    let series = &project["series"][0];
    assert_eq!(series["state"], "bisecting", "{series}");
    assert_eq!(history[0]["upstream_commit"], bad.as_str());
    assert_eq!(history[0]["status"], "bisecting");
    assert_eq!(attrs(&project_html, "data-state"), ["bisecting"]);
    let list = api(&app, "/api/v1/projects").await;
    assert_eq!(list["projects"][1]["series"][0]["state"], "bisecting");
}

#[tokio::test]
async fn a_leased_build_reads_starting_everywhere_and_a_project_poll_error_shows() {
    let mut f = Farm::new().await;
    green_trunk(&mut f).await;
    // A new head: its build is given to agent `a`, which has not started it.
    let head = f.git.commit(RT);
    f.poll_upstream(0).await;
    let leased: Vec<u64> = f.assigned().iter().map(|(j, _, _)| j.job_id).collect();
    assert!(!leased.is_empty(), "its builds are leased");
    // Shouter's repository goes away: its poll fails.
    f.git.broken.lock().unwrap().insert(SHOUTER.to_owned());
    f.poll_project(1).await;
    let app = app(&f);

    let status = api(&app, "/api/v1/status").await;
    let build = status_cell(&status, None, &head);
    assert_eq!(text(&build["state"]), "starting");
    let job = build["job_id"].as_u64().unwrap();
    assert!(leased.contains(&job), "{build}");
    let grid = page(&app, "/").await;
    assert_eq!(
        grid_cell_class(&grid, "<th>rt build</th>", &head),
        "starting"
    );
    let upstream = api(&app, "/api/v1/upstreams/rt").await;
    let newest = &upstream["commits"][0];
    assert_eq!(newest["sha"], head.as_str());
    let builds = newest["builds"].as_array().unwrap();
    assert_eq!(builds.len(), leased.len(), "{newest}");
    for b in builds {
        assert_eq!(b["state"], "starting", "{b}");
    }
    let upstream_html = page(&app, "/upstreams/rt").await;
    assert!(
        attrs(&upstream_html, "data-build")[..builds.len()]
            .iter()
            .all(|s| s == "starting")
    );
    let run = api(&app, &format!("/api/v1/runs/{job}")).await;
    assert_eq!(run["status"], "starting");
    // What the CLI's `status` is sent and prints.
    let grid_rpc = f.pipeline.status("").unwrap();
    for b in &grid_rpc.upstreams[0].latest_builds {
        let sent: trunkfarm_proto::v1::BuildInfo = b.clone().into();
        assert_eq!(sent.commit, head);
        assert_eq!(crate::web::view::pending_build(&sent.phase), "starting");
    }

    // Shouter's poll error, on the grid's page and in its API.
    let shouter = status["upstreams"][0]["projects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "shouter")
        .cloned()
        .unwrap();
    let error = text(&shouter["poll_error"]);
    assert!(!error.is_empty(), "{shouter}");
    assert!(!text(&shouter["branch"]).is_empty(), "{shouter}");
    let adder = &status["upstreams"][0]["projects"][0];
    assert_eq!(
        (adder["name"].as_str(), adder["poll_error"].as_str()),
        (Some("adder"), Some(""))
    );
    let row = &grid[grid.find("<a href=\"/projects/shouter\"").unwrap()..];
    let row = &row[..row.find("</th>").unwrap()];
    assert!(
        row.contains("class=\"poll-error\"") && row.contains(&html_escaped(&error)),
        "{row}"
    );
    assert!(
        !grid[grid.find("<a href=\"/projects/adder\"").unwrap()..]
            .split("</th>")
            .next()
            .unwrap()
            .contains("poll-error")
    );
}
