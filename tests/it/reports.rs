//! Reports that say exactly what was done (#20), through the real binary: the run log, reconcile's
//! repairs, progress, the summary, metrics, dry runs, and the diagnoses that point at the fault.

use ubsync::sim::{Fault, FaultKind};

use crate::cli_sync::{env, scenario, yesterday};
use crate::harness::{text, ONE_TASK_EACH};

fn flat(t: &str) -> String {
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_did_not_happen_is_never_reported_done_and_the_run_log_says_what_reconcile_did(
) {
    let env = env(scenario()).await;
    env.write_config(
        "telephony",
        &format!("[sync]\nstart = \"{}\"\n{ONE_TASK_EACH}", yesterday()),
    );
    assert_eq!(env.ubsync(&["sync"]).await.status.code(), Some(0));
    // The portal lost the missed call's task, and refuses new tasks for now.
    let task = env.sims.bitrix24.tasks()[0].id;
    env.sims.bitrix24.forget_task(task);
    env.sims.bitrix24.inject(Fault::times(
        Some("tasks.task.add"),
        FaultKind::Html(502),
        100,
    ));
    let day = yesterday().to_string();
    let out = env.ubsync(&["reconcile", "--from", &day]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "a difference remains: {t}");
    let f = flat(&t);
    assert!(f.contains("repaired tasks 0"), "{t}");
    assert!(f.contains("not repaired 1 1002"), "{t}");
    assert!(!t.contains("differences repaired"), "{t}");
    let runs = env.ubsync(&["runs"]).await;
    let r = flat(&text(&runs));
    assert!(
        r.contains("reconcile") && r.contains("differences") && r.contains("1 tasks missing"),
        "{r}"
    );
    assert!(r.contains("1 not repaired"), "{r}");

    // The portal takes tasks again: the next reconcile repairs it, and says so.
    env.sims.bitrix24.clear_faults();
    let out = env.ubsync(&["reconcile", "--from", &day]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(flat(&t).contains("repaired tasks 1 1002"), "{t}");
    assert_eq!(env.sims.bitrix24.tasks().len(), 1);
    let status = env.ubsync(&["status"]).await;
    let s = flat(&text(&status));
    assert!(
        s.contains("last reconcile") && s.contains("repaired 0 calls and 1 tasks"),
        "{s}"
    );
    // Settled: a dry run finds nothing left.
    let dry = env
        .ubsync(&["reconcile", "--from", &day, "--dry-run"])
        .await;
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_says_which_lookups_it_would_make() {
    let env = env(scenario()).await;
    // A fresh state over a portal: every call is looked up before anything is sent for it.
    let dry = env.ubsync(&["sync", "--dry-run"]).await;
    let t = text(&dry);
    assert_eq!(dry.status.code(), Some(0), "{t}");
    assert!(t.contains("7 commands planned after 3 lookups"), "{t}");
    for id in ["1001", "1002", "1003"] {
        assert!(t.contains(&format!("lookup call {id}:")), "{t}");
    }
    assert!(env.sims.bitrix24.stats().is_empty(), "nothing sent");
    // After a real pass nothing is left to look up or send.
    assert_eq!(env.ubsync(&["sync"]).await.status.code(), Some(0));
    let dry = env.ubsync(&["sync", "--dry-run"]).await;
    assert!(
        text(&dry).contains("0 commands planned after 0 lookups"),
        "{}",
        text(&dry)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_points_at_a_wrong_portal_address_and_proves_the_client_credentials() {
    let env = env(scenario()).await;
    let ok = env.ubsync(&["check"]).await;
    let t = text(&ok);
    assert_eq!(ok.status.code(), Some(0), "{t}");
    assert!(t.contains("client_id and client_secret proven"), "{t}");
    let good = env.b24();
    let port = good
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();

    // A port nothing listens on (a refused connection): the address is named, not the tokens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    env.edit_config(|t| {
        t.replacen(
            &format!("portal_url = \"{good}\""),
            &format!("portal_url = \"{dead}\""),
            1,
        )
    });
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("cannot reach the portal") && t.contains("refuses connections"),
        "{t}"
    );
    assert!(
        t.contains("bitrix24.portal_url") && !t.contains("install the local application"),
        "{t}"
    );

    // The same portal under another name: the tokens are where the old name put them.
    let other = format!("http://localhost:{port}");
    env.edit_config(|t| {
        t.replacen(
            &format!("portal_url = \"{dead}\""),
            &format!("portal_url = \"{other}\""),
            1,
        )
    });
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains(&format!("they are for 127.0.0.1:{port}")), "{t}");

    // A wrong client secret: the stored access token still works, the refresh does not.
    env.edit_config(|t| {
        t.replacen(
            &format!("portal_url = \"{other}\""),
            &format!("portal_url = \"{good}\""),
            1,
        )
        .replacen("client_secret = \"", "client_secret = \"wrong", 1)
    });
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("oauth") && t.contains("client_secret"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_with_nothing_due_still_shows_an_unreachable_portal_within_max_age() {
    let env = env(scenario()).await;
    assert_eq!(env.ubsync(&["sync"]).await.status.code(), Some(0));
    // Nothing due, the portal answering: a pass sends nothing and exits 0.
    let quiet = env.ubsync(&["sync"]).await;
    assert_eq!(quiet.status.code(), Some(0), "{}", text(&quiet));
    // The portal goes away, and its last answer is older than half of health.max_age (10 min).
    env.sims
        .bitrix24
        .inject(Fault::times(None, FaultKind::Html(502), 1000));
    {
        let store = ubsync::store::Store::open(&env.dir.path().join("state/ubsync.db")).unwrap();
        let now = ubsync::clock::Clock::system().now();
        let old = now - chrono::Duration::minutes(20);
        store
            .set_fact("bitrix24.last_contact", &ubsync::store::ts(old), old)
            .unwrap();
    }
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(
        out.status.code(),
        Some(4),
        "an outage past health.max_age: {t}"
    );
    assert!(t.contains("health.max_age"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_runs_and_show_name_a_missing_state_file_and_create_none() {
    let env = env(scenario()).await;
    // A config pointing at a state no install has (as root with the service's config would).
    env.edit_config(|t| {
        t.replace(
            "path = \"state/ubsync.db\"",
            "path = \"elsewhere/ubsync.db\"",
        )
    });
    let missing = env.dir.path().join("elsewhere/ubsync.db");
    for args in [
        &["status"][..],
        &["runs"],
        &["show", "1001"],
        &["status", "--json"],
    ] {
        let out = env.ubsync(args).await;
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {t}");
        assert!(
            t.contains("there is no state file at") && t.contains("elsewhere"),
            "{t}"
        );
        assert!(!missing.exists(), "{args:?} created the state file");
    }
    env.edit_config(|t| {
        t.replace(
            "path = \"elsewhere/ubsync.db\"",
            "path = \"state/ubsync.db\"",
        )
    });
    let status = env.ubsync(&["status"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    assert!(text(&status).contains("state file  "), "{}", text(&status));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_test_names_the_range_it_searched() {
    let env = env(scenario()).await;
    assert_eq!(env.ubsync(&["sync"]).await.status.code(), Some(0));
    let out = env.ubsync(&["rules", "test"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(" between ") && t.contains("(Europe/Kyiv)"),
        "{t}"
    );
    let day = yesterday().to_string();
    let out = env.ubsync(&["rules", "test", "--from", &day]).await;
    let t = text(&out);
    assert!(t.contains(&format!("3 calls between {day} 00:00")), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_say_what_to_do_and_agree_with_each_other() {
    let env = crate::harness::TestEnv::start(scenario()).await;
    env.write_config("telephony", "");
    // A missing --token-file is a usage error (2), naming the file.
    let out = env
        .ubsync(&[
            "auth",
            "set-refresh-token",
            "--token-file",
            "/nonexistent/token.txt",
        ])
        .await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("/nonexistent/token.txt"), "{t}");
    // Without tokens, the hint pipes the token in (never on the command line).
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert!(
        t.contains("set-refresh-token - <") && !t.contains("set-refresh-token TOKEN"),
        "{t}"
    );
    // One of a thing is not "1 things".
    let s = ubsync::sync::PassSummary {
        pulled: 1,
        windows: 1,
        ..Default::default()
    };
    assert!(
        s.to_string().starts_with("pulled 1 call (1 new")
            || s.to_string().starts_with("pulled 1 call ("),
        "{s}"
    );
    assert!(s.to_string().contains("in 1 window;"), "{s}");
}
