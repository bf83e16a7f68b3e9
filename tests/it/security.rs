//! Security, tried as an attacker would: forged install callbacks, hostile redirects, upstreams
//! that echo secrets back, loose file modes, terminal escapes in upstream data. Each through the
//! real binary over real HTTP.

use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;
use axum::Router;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use ubsync::sim::bitrix24::{DEFAULT_CLIENT_SECRET, DEFAULT_WEBHOOK_CODE};
use ubsync::sim::unitalk::DEFAULT_API_KEY;
use ubsync::sim::Scenario;

use crate::harness::{text, TestEnv};

fn scenario() -> Scenario {
    let tz = chrono_tz::Europe::Kyiv;
    let mut s = Scenario::empty(tz).with_operator(10, "101");
    let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
    let at = |h, m| day.and_hms_opt(h, m, 0).unwrap();
    s.add_call(at(9, 0), "IN", "380501112233", &["101"], "ANSWER", 60, None);
    s.add_call(
        at(9, 30),
        "IN",
        "380671234567",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    s
}

/// A server that records every request it gets and answers with `answer(uri, body)`.
struct Stranger {
    base: String,
    hits: Arc<Mutex<Vec<String>>>,
    _server: ubsync::sim::Served,
}

type Answer = Arc<dyn Fn(&str, &str) -> axum::response::Response + Send + Sync>;

async fn stranger(answer: Answer) -> Stranger {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    let app = Router::new()
        .fallback(
            move |State(_): State<()>, uri: Uri, headers: HeaderMap, body: Bytes| {
                let h = h.clone();
                let answer = answer.clone();
                async move {
                    // The body as seen, with the request's headers, so an echo repeats them too.
                    let body = format!("{} {headers:?}", String::from_utf8_lossy(&body));
                    h.lock().unwrap().push(format!("{uri} {body}"));
                    answer(&uri.to_string(), &body)
                }
            },
        )
        .with_state(());
    let server = ubsync::sim::serve("127.0.0.1:0".parse().unwrap(), app)
        .await
        .unwrap();
    Stranger {
        base: server.base_url(),
        hits,
        _server: server,
    }
}

fn ok_answer() -> Answer {
    Arc::new(|_, _| (StatusCode::OK, axum::Json(json!({"result": {}}))).into_response())
}

async fn post_form(env: &TestEnv, url: &str, fields: &Value) -> u16 {
    let body = ubsync::phpquery::build(fields.as_object().unwrap());
    env.http
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn stored_tokens(env: &TestEnv) -> Option<ubsync::store::OAuthTokens> {
    let store = ubsync::store::Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
    let key = env.b24().trim_start_matches("http://").to_string();
    store.tokens(&key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_install_callbacks_store_nothing_and_endpoints_from_callbacks_are_never_used() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("telephony", "");
    let evil = stranger(ok_answer()).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(env.dir.path().join("ubsync.toml"))
        .args(["auth", "serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let url = first.split_whitespace().nth(2).unwrap().to_string();
    let forged = |f: &mut Value| {
        f["auth"]["access_token"] = json!("forged-access-token-0001");
        f["auth"]["refresh_token"] = json!("forged-refresh-token-0001");
    };

    // Before any install: made-up tokens are refused by app.info, and so stored nowhere.
    let mut f = env.sims.bitrix24.install_callback_fields(1);
    forged(&mut f);
    f["auth"]["client_endpoint"] = json!(format!("{}/rest/", evil.base));
    assert_eq!(post_form(&env, &url, &f).await, 403);
    assert!(stored_tokens(&env).is_none());

    // The genuine install, even with a foreign client_endpoint: stored, endpoint dropped.
    let mut genuine = env.sims.bitrix24.install_callback_fields(1);
    genuine["auth"]["client_endpoint"] = json!(format!("{}/rest/", evil.base));
    genuine["auth"]["server_endpoint"] = json!(format!("{}/", evil.base));
    assert_eq!(post_form(&env, &url, &genuine).await, 200);
    let kept = stored_tokens(&env).expect("the genuine install is stored");
    assert_eq!(
        kept.refresh_token,
        genuine["auth"]["refresh_token"].as_str().unwrap()
    );
    assert_eq!(
        (
            kept.client_endpoint.as_deref(),
            kept.server_endpoint.as_deref()
        ),
        (None, None)
    );

    // Every forgery after it is refused and the genuine pair stays.
    type Forgery = Box<dyn Fn(&mut Value)>;
    let variants: Vec<(&str, Forgery, u16)> = vec![
        (
            "no member_id",
            Box::new(|f: &mut Value| {
                f["auth"].as_object_mut().unwrap().remove("member_id");
            }),
            400,
        ),
        (
            "wrong member_id",
            Box::new(|f: &mut Value| f["auth"]["member_id"] = json!("0000forged0000")),
            403,
        ),
        (
            "no application_token",
            Box::new(|f: &mut Value| {
                f["auth"]
                    .as_object_mut()
                    .unwrap()
                    .remove("application_token");
            }),
            403,
        ),
        (
            "wrong application_token",
            Box::new(|f: &mut Value| {
                f["auth"]["application_token"] = json!("sim-application-tokeX")
            }),
            403,
        ),
        ("tokens app.info rejects", Box::new(forged), 403),
        (
            "another portal",
            Box::new(|f: &mut Value| f["auth"]["domain"] = json!("evil.example")),
            403,
        ),
    ];
    for (what, change, status) in &variants {
        // Fresh, valid tokens each time: only the forged part may make the difference.
        let mut f = env.sims.bitrix24.install_callback_fields(1);
        change(&mut f);
        assert_eq!(post_form(&env, &url, &f).await, *status, "{what}");
        assert_eq!(
            stored_tokens(&env).unwrap().refresh_token,
            kept.refresh_token,
            "{what}: the stored pair must not change"
        );
    }
    child.kill().await.unwrap();

    // Requests go to the configured portal only; the foreign endpoint never hears from ubsync.
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        evil.hits.lock().unwrap().is_empty(),
        "{:?}",
        evil.hits.lock().unwrap()
    );
}

async fn spawn_daemon(env: &TestEnv, args: &[&str]) -> (tokio::process::Child, Vec<String>) {
    let schedules = env.dir.path().join("schedules");
    std::fs::create_dir_all(&schedules).unwrap();
    std::fs::write(
        schedules.join("default.toml"),
        include_str!("../../schedules/default.toml"),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(env.dir.path().join("ubsync.toml"))
        .arg("run")
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut urls = Vec::new();
    for _ in 0..args.iter().filter(|a| a.ends_with("listen")).count() {
        let l = lines.next_line().await.unwrap().unwrap();
        urls.push(l.split_whitespace().nth(2).unwrap().to_string());
    }
    (child, urls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_the_install_route_only_when_configured() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("telephony", "");
    let (mut child, urls) = spawn_daemon(&env, &["--listen", "127.0.0.1:0"]).await;
    let genuine = env.sims.bitrix24.install_callback_fields(1);
    let status = post_form(&env, &format!("{}/install", urls[0]), &genuine).await;
    assert_eq!(status, 404, "no install route beside /metrics by default");
    assert!(stored_tokens(&env).is_none());
    child.kill().await.unwrap();

    let (mut child, urls) = spawn_daemon(
        &env,
        &["--listen", "127.0.0.1:0", "--install-listen", "127.0.0.1:0"],
    )
    .await;
    let status = post_form(&env, &format!("{}/install", urls[0]), &genuine).await;
    assert_eq!(status, 404, "--install-listen is a separate listener");
    assert_eq!(post_form(&env, &urls[1], &genuine).await, 200);
    assert!(stored_tokens(&env).is_some());
    child.kill().await.unwrap();
}

/// A portal that answers every request with a redirect to `to(path)`.
fn redirect_to(to: impl Fn(&str) -> String + Send + Sync + 'static, status: u16) -> Answer {
    Arc::new(move |uri, _| {
        (
            StatusCode::from_u16(status).unwrap(),
            [("location", to(uri))],
            "",
        )
            .into_response()
    })
}

fn all_output(outs: &[&Output]) -> String {
    outs.iter().map(|o| text(o)).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_foreign_host_is_a_configuration_error_and_sends_it_nothing() {
    for mode in ["activity", "telephony"] {
        let env = TestEnv::start(scenario()).await;
        let evil = stranger(ok_answer()).await;
        // `localhost` is another host than the configured 127.0.0.1.
        let evil_base = evil.base.replace("127.0.0.1", "localhost");
        for status in [301u16, 302, 307, 308] {
            let target = evil_base.clone();
            let portal = stranger(redirect_to(move |p| format!("{target}{p}"), status)).await;
            env.write_config(mode, "[sync]\nstart = \"2026-11-22\"\n");
            env.edit_config(|t| t.replace(&env.b24(), &portal.base));
            // The OAuth server stays the simulator, so telephony mode has tokens to send.
            env.edit_config(|t| {
                t.replace(
                    &format!("oauth_url = \"{}\"", portal.base),
                    &format!("oauth_url = \"{}\"", env.b24()),
                )
            });
            if mode == "telephony" && stored_tokens(&env).is_none() {
                let (_, refresh) = env.sims.bitrix24.install_app(1);
                let store =
                    ubsync::store::Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
                let key = portal.base.trim_start_matches("http://").to_string();
                store
                    .save_tokens(
                        &key,
                        &ubsync::store::OAuthTokens {
                            access_token: "sim-would-be-stolen-0001".into(),
                            refresh_token: refresh,
                            expires_at: None,
                            client_endpoint: None,
                            server_endpoint: None,
                            member_id: None,
                            application_token: None,
                            scope: None,
                        },
                        env.clock.now(),
                    )
                    .unwrap();
            }
            let out = env.ubsync(&["sync"]).await;
            let t = text(&out);
            assert_eq!(out.status.code(), Some(2), "{mode} {status}: {t}");
            assert!(
                t.contains(&portal.base) && t.contains(&evil_base),
                "{mode} {status}: {t}"
            );
            assert!(t.contains(&format!("HTTP {status} (")), "{t}");
            assert!(!t.contains(DEFAULT_WEBHOOK_CODE), "{t}");
            assert!(
                evil.hits.lock().unwrap().is_empty(),
                "{mode} {status}: the token went along"
            );
            let status_json = env.ubsync(&["status", "--json"]).await;
            assert!(!text(&status_json).contains(DEFAULT_WEBHOOK_CODE));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_ends_with_a_message_that_names_no_secret() {
    let env = TestEnv::start(scenario()).await;
    let base = Arc::new(Mutex::new(String::new()));
    let b = base.clone();
    let portal = stranger(redirect_to(
        move |p| format!("{}{p}", b.lock().unwrap()),
        302,
    ))
    .await;
    *base.lock().unwrap() = portal.base.clone();
    env.write_config("activity", "[sync]\nstart = \"2026-11-22\"\n");
    env.edit_config(|t| t.replace(&env.b24(), &portal.base));
    let sync = env.ubsync(&["sync"]).await;
    assert_eq!(sync.status.code(), Some(2), "{}", text(&sync));
    assert!(
        text(&sync).contains("too many redirects"),
        "{}",
        text(&sync)
    );
    let status = env.ubsync(&["status", "--json"]).await;
    let all = all_output(&[&sync, &status]);
    assert!(!all.contains(DEFAULT_WEBHOOK_CODE), "{all}");
    let db = std::fs::read(env.dir.path().join("state/ubsync.db")).unwrap();
    let wal = std::fs::read(env.dir.path().join("state/ubsync.db-wal")).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(DEFAULT_WEBHOOK_CODE),
            "the webhook code reached the store"
        );
    }
    // `auth forget-redirect` says what it did.
    let out = env.ubsync(&["auth", "forget-redirect"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// Answers every request with an error whose text repeats the whole request back.
fn echo_answer(kind: &'static str) -> Answer {
    Arc::new(move |uri, body| {
        let echoed = format!("you sent {uri} with {body}");
        match kind {
            "bitrix24" => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "ERROR_CORE", "error_description": echoed})),
            )
                .into_response(),
            _ => (
                StatusCode::OK,
                axum::Json(json!({"status": "Error", "message": echoed})),
            )
                .into_response(),
        }
    })
}

async fn ubsync_traced(env: &TestEnv, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(env.dir.path().join("ubsync.toml"))
        .args(args)
        .env("UBSYNC_LOG", "trace")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap()
}

fn files_text(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for e in walk(dir) {
        if e.to_string_lossy().contains("ubsync.toml") {
            continue; // the config itself holds them, by design
        }
        out.push_str(&String::from_utf8_lossy(
            &std::fs::read(&e).unwrap_or_default(),
        ));
    }
    out
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_outputs_the_store_or_reports_even_when_upstreams_echo_them() {
    for (mode, hostile) in [
        ("activity", "bitrix24"),
        ("telephony", "bitrix24"),
        ("activity", "unitalk"),
    ] {
        let env = TestEnv::start(scenario()).await;
        let echo = stranger(echo_answer(hostile)).await;
        env.write_config(mode, "[sync]\nstart = \"2026-11-22\"\n");
        let mut tokens = Vec::new();
        if mode == "telephony" {
            let ctx = env.ctx().await; // installs and stores a token pair
            let key = env.b24().trim_start_matches("http://").to_string();
            let t = ctx.store.lock().tokens(&key).unwrap().unwrap();
            tokens.push(t.access_token.clone());
            tokens.push(t.refresh_token.clone());
        }
        match hostile {
            "bitrix24" => env.edit_config(|t| {
                t.replace(
                    &format!("portal_url = \"{}\"", env.b24()),
                    &format!("portal_url = \"{}\"", echo.base),
                )
                .replace(
                    &format!("webhook_url = \"{}", env.b24()),
                    &format!("webhook_url = \"{}", echo.base),
                )
            }),
            _ => env.edit_config(|t| t.replace(&env.sims.unitalk_url(), &echo.base)),
        }
        if mode == "telephony" {
            // The tokens now belong to the echoing portal's key.
            let store =
                ubsync::store::Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
            let old = env.b24().trim_start_matches("http://").to_string();
            let t = store.tokens(&old).unwrap().unwrap();
            store
                .save_tokens(echo.base.trim_start_matches("http://"), &t, env.clock.now())
                .unwrap();
        }
        let mut outs = Vec::new();
        for args in [
            &["check"][..],
            &["sync"],
            &["sync", "--dry-run"],
            &["status"],
            &["status", "--json"],
            &["retry", "--all"],
            &["reconcile", "--from", "2026-11-22"],
            &["backfill", "--from", "2026-11-22", "--to", "2026-11-22"],
        ] {
            outs.push(ubsync_traced(&env, args).await);
        }
        assert!(
            !echo.hits.lock().unwrap().is_empty(),
            "{mode}/{hostile}: the hostile upstream was never asked"
        );
        let printed = all_output(&outs.iter().collect::<Vec<_>>());
        let stored = files_text(env.dir.path());
        let configured = [DEFAULT_API_KEY, DEFAULT_CLIENT_SECRET, DEFAULT_WEBHOOK_CODE];
        for secret in configured
            .iter()
            .copied()
            .chain(tokens.iter().map(String::as_str))
        {
            assert!(
                !printed.contains(secret),
                "{mode}/{hostile}: {secret} printed:\n{printed}"
            );
        }
        for secret in configured {
            assert!(
                !stored.contains(secret),
                "{mode}/{hostile}: {secret} stored in the state directory"
            );
        }
        assert!(
            printed.contains("[redacted]"),
            "{mode}/{hostile}: nothing was echoed?\n{printed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_is_private_under_a_permissive_umask_and_check_warns_about_loose_files() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "[sync]\nstart = \"2026-11-22\"\n");
    let run = |args: &str| {
        let cfg = env.dir.path().join("ubsync.toml");
        let cmd = format!(
            "umask 022; exec '{}' --config '{}' {args}",
            env!("CARGO_BIN_EXE_ubsync"),
            cfg.display()
        );
        std::process::Command::new("sh")
            .args(["-c", &cmd])
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let out = run("sync");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = run("reconcile --from 2026-11-22 --dry-run");
    assert!(out.status.code().is_some(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let state = env.dir.path().join("state");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    for f in walk(&state) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert!(walk(&state)
        .iter()
        .any(|f| f.to_string_lossy().contains("reports")));
    let out = run("check --offline");
    assert!(!text(&out).contains("WARN"), "{}", text(&out));
    std::fs::set_permissions(
        state.join("ubsync.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = run("check --offline");
    assert!(
        text(&out).contains("ubsync.db is readable by others (mode 644)"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_from_unitalk_never_reach_the_terminal() {
    let mut s = scenario();
    let mut evil = s.calls[0].clone();
    evil.id = 4242;
    evil.raw_override = Some(json!({
        "id": "77\u{1b}]0;owned\u{7}\u{1b}[2J",
        "date": "22/11/2026 \u{1b}[31mred",
        "direction": "IN",
    }));
    s.calls.push(evil);
    let env = TestEnv::start(s).await;
    env.write_config("activity", "[sync]\nstart = \"2026-11-22\"\n");
    let sync = env.ubsync(&["sync"]).await;
    let status = env.ubsync(&["status"]).await;
    let retry = env.ubsync(&["retry", "--all"]).await;
    let all = all_output(&[&sync, &status, &retry]);
    assert!(all.contains("quarantine  1 open"), "{all}");
    for c in ['\u{1b}', '\u{7}'] {
        assert!(
            !all.contains(c),
            "a control character reached the terminal:\n{all:?}"
        );
    }
    assert!(all.contains("\\u{1b}"), "escaped, not dropped:\n{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_refresh_token_reads_standard_input_and_warns_about_the_command_line() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("telephony", "");
    let (_, refresh) = env.sims.bitrix24.install_app(1);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(env.dir.path().join("ubsync.toml"))
        .args(["auth", "set-refresh-token", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{refresh}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("visible in `ps`"), "{}", text(&out));
    assert!(
        !env.sims.bitrix24.refresh_token_valid(&refresh),
        "exchanged"
    );

    let (_, refresh) = env.sims.bitrix24.install_app(1);
    let out = env.ubsync(&["auth", "set-refresh-token", &refresh]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("visible in `ps`"), "{}", text(&out));
    assert!(!text(&out).contains(&refresh), "{}", text(&out));

    let out = env.ubsync(&["auth", "set-refresh-token", "-"]).await;
    assert_eq!(out.status.code(), Some(2), "empty stdin: {}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unitalk_redirect_to_a_foreign_host_keeps_the_key_home() {
    let env = TestEnv::start(scenario()).await;
    let evil = stranger(ok_answer()).await;
    let evil_base = evil.base.replace("127.0.0.1", "localhost");
    let target = evil_base.clone();
    let moved = stranger(redirect_to(move |p| format!("{target}{p}"), 307)).await;
    env.write_config("activity", "[sync]\nstart = \"2026-11-22\"\n");
    env.edit_config(|t| t.replace(&env.sims.unitalk_url(), &format!("{}/api", moved.base)));
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("HTTP 307 (Temporary Redirect)") && t.contains(&evil_base),
        "{t}"
    );
    assert!(
        evil.hits.lock().unwrap().is_empty(),
        "the API key went along"
    );
    assert!(!t.contains(DEFAULT_API_KEY), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_move_is_shown_by_check_and_the_configured_address_wins_after_an_edit() {
    let env = TestEnv::start(scenario()).await;
    let old = ubsync::sim::serve(
        "127.0.0.1:0".parse().unwrap(),
        env.sims.bitrix24.moved_router(&env.b24()),
    )
    .await
    .unwrap();
    env.write_config("activity", "[sync]\nstart = \"2026-11-22\"\n");
    env.edit_config(|t| {
        t.replace(
            &format!("webhook_url = \"{}", env.b24()),
            &format!("webhook_url = \"{}", old.base_url()),
        )
    });
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("pushed 2"), "{}", text(&out));
    let facts = {
        let st = ubsync::store::Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
        st.fact(&format!("bitrix24.moved:{}", old.base_url()))
            .unwrap()
    };
    assert_eq!(facts.as_deref(), Some(env.b24().as_str()), "{}", text(&out));
    let check = env.ubsync(&["check"]).await;
    let t = text(&check);
    assert!(
        t.contains(&format!("configured {}", old.base_url()))
            && t.contains(&format!("redirect to {}", env.b24())),
        "{t}"
    );
    // The admin fixes the config: the configured address is used, the old move is irrelevant.
    env.edit_config(|t| t.replace(&old.base_url(), &env.b24()));
    let check = env.ubsync(&["check"]).await;
    assert!(!text(&check).contains("WARN"), "{}", text(&check));
    // And forgetting it on the old config sends requests to the old address again.
    env.edit_config(|t| {
        t.replace(
            &format!("webhook_url = \"{}", env.b24()),
            &format!("webhook_url = \"{}", old.base_url()),
        )
    });
    let out = env.ubsync(&["auth", "forget-redirect"]).await;
    assert!(text(&out).contains("forgot that"), "{}", text(&out));
    let before = env.sims.bitrix24.requests().len();
    let check = env.ubsync(&["check"]).await;
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert!(
        env.sims.bitrix24.requests()[before..]
            .iter()
            .any(|r| r.status == 302),
        "after forget-redirect the configured (old) address is asked again"
    );
}
