//! An independent, widely used Bitrix24 client (fast_bitrix24, from PyPI) against the simulator:
//! its batching and its 503 back-off must work as they do against a real portal.
//!
//! `bash tests/run` installs the client into a virtualenv and points UBSYNC_PYTHON at it.

use crate::harness::TestEnv;
use ubsync::clock::Clock;
use ubsync::sim::{Bitrix24SimConfig, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_bitrix24_batches_and_rate_limit_handling_work_against_the_simulator() {
    let python = std::env::var("UBSYNC_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import fast_bitrix24"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        if std::env::var_os("UBSYNC_SKIP_PYTHON").is_some() {
            eprintln!("SKIPPED: fast_bitrix24 not installed and UBSYNC_SKIP_PYTHON is set");
            return;
        }
        panic!("fast_bitrix24 is not importable with {python}; run the tests with `bash tests/run`, which installs it");
    }
    // A real clock: the client backs off in real time and the bucket must drain meanwhile.
    let env = TestEnv::with(
        Scenario::empty(chrono_tz::Europe::Kyiv),
        Bitrix24SimConfig::default(),
        Clock::system(),
    )
    .await;
    // Another app on the same IP has just filled the bucket: the first request gets a 503.
    env.sims.bitrix24.set_bucket_level(50.0);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/fast_bitrix24_check.py"
    );
    let out = tokio::process::Command::new(&python)
        .args([script, &env.webhook(), "120"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fast_bitrix24 failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(seen["added"], 120);
    assert_eq!(seen["unique_ids"], 120);
    assert_eq!(seen["listed"], 120);
    assert_eq!(seen["me"], "1");
    assert_eq!(seen["same"], "1", "$result reference resolved");

    assert_eq!(
        env.sims.bitrix24.created_leads().len(),
        120,
        "no lead lost or duplicated by retries"
    );
    let reqs = env.sims.bitrix24.requests();
    let throttled = reqs.iter().filter(|r| r.status == 503).count();
    assert!(
        throttled >= 1,
        "the client must have met QUERY_LIMIT_EXCEEDED"
    );
    let batches = reqs
        .iter()
        .filter(|r| r.method == "batch" && r.status == 200)
        .count();
    assert!(batches >= 3, "120 adds travel in batches of at most 50");
}
