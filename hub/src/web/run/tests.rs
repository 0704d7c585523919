//! The run page and its API over a real farm (`pipeline::tests::Farm`: a
//! temporary store, dispatch, results, notifier, logs), through the web
//! endpoint's own router.

use axum::body::Body;
use axum::http::Request;
use serde_json::Value;
use tower::ServiceExt as _;
use trunkfarm_proto::v1::{JobSpec, LogChunk, LogStream, Repository, TransitionKind};

use super::*;
use crate::notify::render;
use crate::pipeline::tests::{Farm, regressed_farm};

/// `GET path` from the web endpoint's router over `site`.
async fn get(site: &Site, path: &str) -> (StatusCode, String) {
    let response = crate::web::test_router(site.clone())
        .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn get_json(site: &Site, path: &str) -> (StatusCode, Value) {
    let (status, body) = get(site, path).await;
    (status, serde_json::from_str(&body).unwrap())
}

/// What the page shows of `text`, HTML-escaped the way askama escapes it.
fn shown(text: &str) -> String {
    askama::filters::escape(text, askama::filters::Html)
        .unwrap()
        .to_string()
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v:#}"))
}

/// The "The run:" link of the mail about transition `t`, as a path.
fn mail_run_link(t: &crate::results::Transition) -> String {
    let mail = render::transition(
        t,
        &render::Context {
            branch: "main",
            log: &render::Quote::Nothing,
            run: None,
            public_url: "http://hub.test",
            unsubscribe_url: "http://hub.test/unsubscribe?token=x",
            reminder: None,
            follow_up: false,
        },
    );
    mail.text
        .lines()
        .find_map(|l| l.trim().strip_prefix("The run:"))
        .unwrap_or_else(|| panic!("{}", mail.text))
        .trim()
        .strip_prefix("http://hub.test")
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_went_red_mails_run_link_opens_the_run_the_api_says_the_same() {
    let f: Farm = regressed_farm().await;
    let site = f.site();
    let went_red = site
        .pipeline
        .transitions("rt", "shouter", 10, false)
        .unwrap()
        .into_iter()
        .find(|t| t.kind == TransitionKind::WentRed as i32)
        .unwrap();
    // The link the went-red mail carries.
    let link = mail_run_link(&went_red);
    assert_eq!(link, format!("/runs/{}", went_red.job_id));

    let (status, page) = get(&site, &link).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (status, json) = get_json(&site, &format!("/api/v1{link}")).await;
    assert_eq!(status, StatusCode::OK, "{json:#}");

    // What the API says, the page says.
    assert_eq!(json["id"], went_red.job_id);
    assert_eq!(s(&json, "kind"), "test");
    assert_eq!(s(&json, "status"), "failed");
    assert_eq!(s(&json, "verdict"), "red");
    assert_eq!(s(&json, "transition"), "went_red");
    assert_eq!(s(&json, "class"), "regressed");
    assert_eq!(s(&json, "project"), "shouter");
    assert_eq!(s(&json, "upstream"), "rt");
    assert_eq!(s(&json, "upstream_commit"), went_red.upstream_commit);
    assert_eq!(s(&json, "platform"), "linux");
    assert_eq!(
        s(&json, "created_at"),
        view::rfc3339(json["created_at_ms"].as_u64().unwrap())
    );
    assert!(!s(&json, "finished_at").is_empty());
    let agent = s(&json, "agent");
    assert!(agent == "alice-box" || agent == "bob-box", "{agent}");
    for key in [
        "status",
        "verdict",
        "class",
        "agent",
        "what",
        "upstream_commit",
        "artifact_sha256",
        "queued_for",
        "ran_for",
        "reproduce",
    ] {
        assert!(!s(&json, key).is_empty(), "{key} is empty: {json:#}");
        assert!(
            page.contains(&shown(s(&json, key))),
            "the page lacks {key} {:?}:\n{page}",
            s(&json, key)
        );
    }
    // The failing test, first, with its message.
    let cases = json["tests"]["cases"].as_array().unwrap();
    assert_eq!(s(&cases[0], "status"), "failed");
    assert_eq!(s(&cases[0], "name"), "s.upper");
    assert!(s(&cases[0], "message").contains("expected ABC"), "{json:#}");
    assert!(page.contains("s.upper") && page.contains("expected ABC"));
    // Links to the project's and the upstream's pages and to the runtime's build.
    assert!(page.contains("href=\"/projects/shouter\""), "{page}");
    assert!(page.contains("href=\"/upstreams/rt\""), "{page}");
    let runtime_job = json["runtime_job"].as_u64().unwrap();
    assert!(runtime_job > 0);
    assert!(page.contains(&format!("href=\"/runs/{runtime_job}\"")));
    // Its re-runs, in words, by agent name only.
    assert_eq!(s(&json["confirmation"], "state"), "confirmed");
    let reruns = json["confirmation"]["reruns"].as_array().unwrap();
    let kinds: Vec<&str> = reruns.iter().map(|r| s(r, "kind")).collect();
    assert_eq!(kinds, ["again", "baseline"], "{json:#}");
    for r in reruns {
        assert!(page.contains(&format!("href=\"/runs/{}\"", r["job_id"])));
    }
    assert!(page.contains(s(&json["confirmation"], "words")));
    for a in site.credentials.list_agents().unwrap() {
        assert!(!page.contains(&a.id) && !json.to_string().contains(&a.id));
    }
    // The commands to run it again.
    let reproduce = s(&json, "reproduce");
    assert!(
        reproduce.contains("git clone fake:shouter src"),
        "{reproduce}"
    );
    assert!(reproduce.contains("sh -c 'make test'"), "{reproduce}");
    assert!(reproduce.contains(&format!("{}.tar.zst", s(&json, "artifact_sha256"))));

    // The runtime's build has its page too, and a re-run has its own.
    let (_, build) = get_json(&site, &format!("/api/v1/runs/{runtime_job}")).await;
    assert_eq!(s(&build, "kind"), "build");
    assert_eq!(s(&build, "verdict"), "passed");
    assert_eq!(s(&build, "artifact_sha256"), s(&json, "artifact_sha256"));
    assert!(s(&build, "reproduce").contains("export PREFIX="));
    let again = reruns[0]["job_id"].as_u64().unwrap();
    let (_, rerun) = get_json(&site, &format!("/api/v1/runs/{again}")).await;
    assert_eq!(s(&rerun, "kind"), "rerun");
    assert_eq!(rerun["confirmation"]["original"], went_red.job_id);
    // A runtime build's mail links its build's page.
    let build_t = site
        .pipeline
        .transitions("rt", "", 100, true)
        .unwrap()
        .into_iter()
        .find(|t| t.project.is_empty())
        .unwrap();
    let (status, b) = get_json(&site, &format!("/api/v1{}", mail_run_link(&build_t))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s(&b, "kind"), "build");
    assert_eq!(b["id"], build_t.job_id);
    // Its reports left its record when the pipeline took it in; nothing
    // claims they were broken.
    assert_eq!(rerun["tests"]["report_error"], "", "{rerun:#}");
}

#[tokio::test]
async fn a_queued_job_says_why_it_waits_and_an_unknown_one_is_404() {
    let f = regressed_farm().await;
    let site = f.site();
    let id = site
        .dispatch
        .submit(
            JobSpec {
                commands: vec!["nvidia-smi".into()],
                labels: vec!["gpu".into()],
                project: "shouter".into(),
                repository: Some(Repository {
                    url: "https://ci:s3cret@git.example.org/x.git".into(),
                    rev: "main".into(),
                }),
                ..Default::default()
            },
            1,
        )
        .await
        .unwrap();
    let (status, json) = get_json(&site, &format!("/api/v1/runs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s(&json, "status"), "queued");
    assert_eq!(s(&json, "kind"), "job");
    assert_eq!(s(&json, "waiting"), "no connected agent has label `gpu`");
    assert_eq!(json["log"]["attempt"], 0);
    let (_, page) = get(&site, &format!("/runs/{id}")).await;
    assert!(
        page.contains(&shown("no connected agent has label `gpu`")),
        "{page}"
    );
    assert!(page.contains("No agent has run it yet"));
    assert!(!page.contains("s3cret") && !json.to_string().contains("s3cret"));

    for path in [
        "/runs/999999",
        "/api/v1/runs/999999",
        "/runs/x",
        "/api/v1/runs/999999/log",
    ] {
        let (status, body) = get(&site, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert!(
            body.contains("no job 999999") || body.contains("not a job id"),
            "{body}"
        );
        if body.contains("no job 999999") {
            // A link from a page kept longer than the job: says where to look.
            assert!(body.contains("`retention.jobs`"), "{body}");
        }
    }
    let (status, body) = get(&site, &format!("/api/v1/runs/{id}/log?offset=-1")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // The live tail's script is served by the hub itself.
    let (status, script) = get(&site, "/static/tail.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(script.contains("next_offset"));
    let (_, page) = get(&site, &format!("/runs/{id}")).await;
    assert!(page.contains("<script src=\"/static/tail.js\" defer></script>"));
}

/// Why a job waits names the agents that refuse it by their display
/// names: an agent's id is half its credential (`{id}.{secret}`), and the
/// run page is public.
#[tokio::test]
async fn why_a_job_waits_names_agents_by_name_never_by_id() {
    let f = regressed_farm().await;
    let site = f.site();
    // An agent with the label `gpu` but not `linux`; the others have
    // `linux` only: each refuses the job for a reason of its own.
    let gpu = f.enroll("gpu-box", Default::default()).await;
    let _rx =
        crate::dispatch::tests::join_as(&site.dispatch, &gpu, "gpu-box", 1, &["gpu"], &[], true)
            .await;
    let id = site
        .dispatch
        .submit(
            JobSpec {
                commands: vec!["nvidia-smi".into()],
                labels: vec!["linux".into(), "gpu".into()],
                ..Default::default()
            },
            1,
        )
        .await
        .unwrap();
    let (_, json) = get_json(&site, &format!("/api/v1/runs/{id}")).await;
    let waiting = s(&json, "waiting");
    assert_eq!(
        waiting,
        "agent `A` lacks label `gpu`; agent `alice-box` lacks label `gpu`; \
         agent `bob-box` lacks label `gpu`; agent `gpu-box` lacks label `linux`"
    );
    let (_, page) = get(&site, &format!("/runs/{id}")).await;
    assert!(page.contains(&shown(waiting)), "{page}");
    let agents = site.credentials.list_agents().unwrap();
    assert_eq!(agents.len(), 3);
    for a in agents {
        assert!(a.id.starts_with("ag_"), "{}", a.id);
        assert!(!page.contains(&a.id), "{} on the page:\n{page}", a.id);
        assert!(!json.to_string().contains(&a.id), "{} in {json:#}", a.id);
    }
}

/// The transition a run made is looked for among those recorded since its
/// job was created, not in the whole history: a job that made none costs
/// the transitions since it.
#[tokio::test]
async fn a_runs_transition_is_looked_for_only_since_its_job_was_created() {
    let f = regressed_farm().await;
    let site = f.site();
    let all = site.pipeline.transitions("", "", usize::MAX, true).unwrap();
    let went_red = all
        .iter()
        .find(|t| t.kind == TransitionKind::WentRed as i32)
        .unwrap();
    let rec = site.dispatch.get(went_red.job_id).unwrap().unwrap();
    let facts = site.pipeline.run_facts(&rec).await.unwrap();
    assert_eq!(facts.transition.map(|t| t.id), Some(went_red.id));
    // The same job, had it been created after the transition was recorded:
    // the scan stops before reaching it.
    let later = JobRecord {
        created_at_ms: went_red.at_ms + 1,
        ..rec
    };
    let facts = site.pipeline.run_facts(&later).await.unwrap();
    assert!(facts.transition.is_none(), "{:?}", facts.transition);
    // A finished job that made no transition: its page says none.
    let quiet = site
        .dispatch
        .list(
            |j| {
                j.result.is_some()
                    && !all
                        .iter()
                        .any(|t| t.job_id == j.id || t.confirmed_by_job == j.id)
            },
            1,
        )
        .unwrap()
        .pop()
        .expect("a job without a transition");
    let (status, json) = get_json(&site, &format!("/api/v1/runs/{}", quiet.id)).await;
    assert_eq!(status, StatusCode::OK, "{json:#}");
    assert_eq!(json["transition"], "", "{json:#}");
}

/// The reproduce-it-locally commands are public: a secret-looking
/// variable's value is not shown, and names and values are shell-quoted.
#[tokio::test]
async fn reproducing_a_job_hides_secret_looking_env_values_and_quotes_the_rest() {
    let f = regressed_farm().await;
    let site = f.site();
    let env = [
        ("GITHUB_TOKEN", "ghp_t0ken"),
        ("api_key", "k3y-value"),
        ("Db_Passwd", "hunter2"),
        ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
        ("NPM_AUTH", "npm-auth-value"),
        ("CREDENTIALS_JSON", "{\"c\": 1}"),
        ("MODE", "fast and loose"),
        ("X$(id)", "it's"),
    ];
    let id = site
        .dispatch
        .submit(
            JobSpec {
                commands: vec!["make test".into()],
                labels: vec!["gpu".into()],
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            1,
        )
        .await
        .unwrap();
    let (_, json) = get_json(&site, &format!("/api/v1/runs/{id}")).await;
    let reproduce = s(&json, "reproduce");
    let (_, page) = get(&site, &format!("/runs/{id}")).await;
    assert!(page.contains(&shown(reproduce)), "{page}");
    for (name, value) in &env[..6] {
        assert!(
            reproduce.contains(&format!("export {name}='<redacted>'\n")),
            "{name}: {reproduce}"
        );
        assert!(!reproduce.contains(value), "{value}: {reproduce}");
        assert!(!page.contains(&shown(value)), "{value} on the page");
    }
    assert!(
        reproduce.contains("export MODE='fast and loose'\n"),
        "{reproduce}"
    );
    assert!(
        reproduce.contains("export 'X$(id)'='it'\\''s'\n"),
        "{reproduce}"
    );
}

#[tokio::test]
async fn the_log_is_paged_from_its_end_and_the_api_pages_it_the_same() {
    let f = regressed_farm().await;
    let site = f.site();
    let id = site
        .pipeline
        .transitions("rt", "shouter", 1, false)
        .unwrap()[0]
        .job_id;
    let (_, json) = get_json(&site, &format!("/api/v1/runs/{id}")).await;
    let attempt = json["log"]["attempt"].as_u64().unwrap() as u32;
    assert_eq!(attempt, 1);
    // 200 KiB of numbered lines, in 10 KiB chunks, and one "é" cut by a
    // page's end.
    let mut log = String::new();
    for n in 0..20_000 {
        log.push_str(&format!("line {n:05}\n"));
    }
    log.insert(LOG_PAGE as usize - 1, 'é');
    for (seq, piece) in log.as_bytes().chunks(10 * 1024).enumerate() {
        site.logs
            .append(LogChunk {
                job: Some(trunkfarm_proto::v1::JobRef {
                    job_id: id,
                    attempt,
                }),
                seq: seq as u64 + 1_000,
                stream: LogStream::Stdout.into(),
                data: piece.to_vec(),
            })
            .unwrap();
    }
    let stored = site.logs.size(id, attempt).await.unwrap();
    assert!(stored >= log.len() as u64);

    // The page shows the end, with a link to the page before; it walks the
    // attempt's chunks twice (measuring the log once, then reading its page).
    let walks = || site.logs.walks.load(std::sync::atomic::Ordering::Relaxed);
    let before = walks();
    let (_, page) = get(&site, &format!("/runs/{id}")).await;
    assert_eq!(walks() - before, 2);
    assert!(page.contains("line 19999"));
    assert!(!page.contains("line 00000"));
    let earlier = stored - 2 * LOG_PAGE;
    assert!(
        page.contains(&format!("/runs/{id}?attempt=1&amp;offset={earlier}#log")),
        "{page}"
    );
    // The API pages through all of it, capped per request, losing nothing.
    let mut text = String::new();
    let mut offset = 0;
    loop {
        let (status, p) = get_json(
            &site,
            &format!("/api/v1/runs/{id}/log?offset={offset}&limit={LOG_PAGE}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(p["next_offset"].as_u64().unwrap() - offset <= LOG_PAGE);
        assert_eq!(p["running"], false);
        text.push_str(s(&p, "text"));
        offset = p["next_offset"].as_u64().unwrap();
        if offset >= p["total"].as_u64().unwrap() {
            break;
        }
    }
    let whole: String = site
        .logs
        .read(id, Some(attempt))
        .await
        .unwrap()
        .iter()
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert_eq!(text, whole, "paged = whole");
    let (_, capped) = get_json(
        &site,
        &format!("/api/v1/runs/{id}/log?offset=0&limit=99999999"),
    )
    .await;
    assert_eq!(
        capped["next_offset"].as_u64().unwrap(),
        MAX_LOG_LIMIT.min(stored)
    );
    // An attempt the job never had.
    let (status, _) = get(&site, &format!("/api/v1/runs/{id}/log?attempt=7")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A compacted log whose object is gone: the page and the API say so in
/// general words, never with the store's paths or errors.
#[tokio::test]
async fn an_unreadable_log_is_described_without_store_details() {
    let f = regressed_farm().await;
    let site = f.site();
    let id = site
        .pipeline
        .transitions("rt", "shouter", 1, false)
        .unwrap()[0]
        .job_id;
    site.logs
        .append(LogChunk {
            job: Some(trunkfarm_proto::v1::JobRef {
                job_id: id,
                attempt: 1,
            }),
            seq: 1_000,
            stream: LogStream::Stdout.into(),
            data: b"compacted then lost\n".to_vec(),
        })
        .unwrap();
    site.logs.compact(id, 1).await.unwrap();
    let object = f
        .store
        .dir()
        .join("test-objects")
        .join(crate::logs::object_name(id, 1));
    std::fs::remove_file(&object).unwrap();
    let (_, page) = get(&site, &format!("/runs/{id}")).await;
    assert!(page.contains(&shown(crate::logs::UNREADABLE)), "{page}");
    let (status, body) = get(&site, &format!("/api/v1/runs/{id}/log")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains(crate::logs::UNREADABLE), "{body}");
    for shown_to_all in [&page, &body] {
        assert!(!shown_to_all.contains("log.zst"), "{shown_to_all}");
        assert!(!shown_to_all.contains("test-objects"), "{shown_to_all}");
    }
}

#[test]
fn a_page_never_cuts_a_character_in_two() {
    let data = "aé€😀z".as_bytes().to_vec();
    for start in 0..data.len() {
        for end in start..=data.len() {
            let r = LogRange {
                offset: start as u64,
                data: data[start..end].to_vec(),
                next_offset: end as u64,
                total: data.len() as u64,
            };
            let (text, from, to) = utf8_page(&r);
            assert!(!text.contains('\u{FFFD}'), "{start}..{end}: {text:?}");
            assert_eq!(text.as_bytes(), &data[from as usize..to as usize]);
        }
    }
}
