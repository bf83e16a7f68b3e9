//! Errors an admin meets, through the real binary: a wrong host is a configuration error that
//! names the host and the key (exit 2), a passing outage is 75, a long one is not.

use std::process::Stdio;

use crate::harness::{text, TestEnv};
use ubsync::sim::Scenario;

fn scenario() -> Scenario {
    Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101")
}

/// A server that is not Bitrix24 or Unitalk: every path is an HTML 404.
async fn some_other_server() -> ubsync::sim::Served {
    let router = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::NOT_FOUND,
            [("content-type", "text/html")],
            "<html><body><h1>404 Not Found</h1></body></html>",
        )
    });
    ubsync::sim::serve("127.0.0.1:0".parse().unwrap(), router)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_spoken_to_a_plain_http_server_is_a_configuration_error_naming_the_key() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    let http = env.sims.unitalk_url();
    env.edit_config(|t| {
        t.replace(
            &format!("base_url = \"{http}\""),
            &format!("base_url = \"{}\"", http.replacen("http://", "https://", 1)),
        )
    });
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("TLS with 127.0.0.1:"), "{t}");
    assert!(t.contains("unitalk.base_url"), "{t}");
    assert!(!t.contains("temporarily unavailable"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_bitrix24_or_unitalk_is_a_configuration_error() {
    let env = TestEnv::start(scenario()).await;
    let other = some_other_server().await;
    env.write_config("activity", "");
    let webhook = env.webhook();
    env.edit_config(|t| {
        t.replace(
            &format!("webhook_url = \"{webhook}\""),
            &format!("webhook_url = \"{}/rest/1/abc/\"", other.base_url()),
        )
    });
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("not a Bitrix24 REST answer"), "{t}");
    assert!(t.contains("bitrix24.webhook_url"), "{t}");
    assert!(
        !t.contains("/rest/1/abc"),
        "the webhook path holds its secret: {t}"
    );

    env.write_config("activity", "");
    let unitalk = env.sims.unitalk_url();
    env.edit_config(|t| {
        t.replace(
            &format!("base_url = \"{unitalk}\""),
            &format!("base_url = \"{}/api/\"", other.base_url()),
        )
    });
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("not a Unitalk API answer") && t.contains("unitalk.base_url"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_port_is_temporary_at_first_and_an_outage_past_health_max_age_is_not() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "[health]\nmax_age = \"10m\"\n");
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unitalk = env.sims.unitalk_url();
    env.edit_config(|t| {
        t.replace(
            &format!("base_url = \"{unitalk}\""),
            &format!("base_url = \"http://127.0.0.1:{port}/api/\"\nretry_base_delay = \"5ms\""),
        )
    });
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(75), "{t}");
    assert!(t.contains("refused the connection"), "{t}");

    // The first attempt was an hour ago and nothing has succeeded since.
    let cfg = env.config();
    let store = ubsync::store::Store::open(&cfg.state.path).unwrap();
    let hour_ago = ubsync::clock::Clock::system().now() - chrono::Duration::hours(1);
    let id = store.begin_run("sync", hour_ago).unwrap();
    store
        .finish_run(id, hour_ago, "failed", None, Some("down"))
        .unwrap();
    drop(store);
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(4), "{t}");
    assert!(t.contains("health.max_age") && t.contains("outage"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_into_a_closed_pipe_is_not_a_panic() {
    let env = TestEnv::start(scenario()).await;
    let path = env.write_config("activity", "");
    for args in [
        &["status"][..],
        &["--help"][..],
        &["status", "--json"][..],
        &[
            "reconcile",
            "--from",
            "2026-11-20",
            "--to",
            "2026-11-21",
            "--dry-run",
        ][..],
    ] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written (`ubsync status | head -0`).
        drop(child.stdout.take());
        let out = child.wait_with_output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_journald_every_line_carries_its_syslog_priority_and_no_colour() {
    let env = TestEnv::start(scenario()).await;
    let path = env.write_config("activity", "");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let unitalk = env.sims.unitalk_url();
    env.edit_config(|t| {
        t.replace(
            &format!("base_url = \"{unitalk}\""),
            &format!("base_url = \"http://127.0.0.1:{port}/api/\"\nretry_base_delay = \"5ms\""),
        )
    });
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(&path)
        .args(["sync", "--color", "auto"])
        .env("JOURNAL_STREAM", "8:12345")
        .env_remove("NO_COLOR")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let p = line.get(..3).unwrap_or("");
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&p),
            "no syslog priority: {line:?} in\n{err}"
        );
        assert!(!line.contains('\x1b'), "colour under journald: {line:?}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("<4>")),
        "warnings at 4: {err}"
    );
    assert!(
        lines.last().unwrap().starts_with("<3>ubsync: error:"),
        "the final error at 3: {err}"
    );

    // Off journald, --color=always colours and --color=never does not.
    for (choice, coloured) in [("always", true), ("never", false)] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
            .arg("--config")
            .arg(&path)
            .args(["sync", "--color", choice])
            .env_remove("JOURNAL_STREAM")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.contains('\x1b'), coloured, "--color={choice}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_argument_is_a_usage_error_named_once_not_a_config_file_problem() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    for (args, flag) in [
        (
            &["backfill", "--from", "garbage", "--to", "2026-11-02"][..],
            "--from",
        ),
        (
            &["backfill", "--from", "2026-11-05", "--to", "2026-11-02"][..],
            "--to",
        ),
        (&["reconcile", "--from", "2026-13-01"][..], "--from"),
    ] {
        let out = env.ubsync(args).await;
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{t}");
        assert!(!t.contains("config file"), "{args:?}: {t}");
        assert_eq!(
            t.matches(flag).count(),
            if flag == "--to" { 2 } else { 1 },
            "{t}"
        );
    }
    let missing = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .args(["--config", "/nonexistent/ubsync.toml", "status"])
        .output()
        .await
        .unwrap();
    let t = text(&missing);
    assert_eq!(missing.status.code(), Some(2), "{t}");
    assert_eq!(t.matches("No such file").count(), 1, "the cause once: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_and_sim_refuse_a_config_they_would_ignore_and_sim_names_a_busy_port() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    for cmd in ["demo", "sim"] {
        let out = env.ubsync(&[cmd]).await;
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{t}");
        assert!(t.contains("--config") && t.contains("drop --config"), "{t}");
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .args(["sim", "--unitalk", &addr, "--bitrix24", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("Unitalk simulator cannot listen on {addr}"))
            && t.contains("--unitalk"),
        "{t}"
    );
    drop(busy);
}
