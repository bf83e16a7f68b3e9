//! Push-throughput benchmark: a large backlog through the Bitrix24 simulator at the standard
//! plan's limits (burst 50, 2 requests/s), by the real `ubsync` binary over real HTTP.
//!
//! Run: `cargo bench --bench push` (optionally `-- --calls 8000 --mode activity --attach-record`).
//! Prints calls/s, Bitrix24 commands/s, commands per request, the ratio of achieved commands/s
//! to the ceiling (2 requests/s × 50 commands = 100 commands/s) both overall and *sustained*
//! (measured at the portal from 10 s after the first request, so the initial burst of 50 does not
//! flatter it), 503s received, and the peak resident memory of the ubsync process. Takes a few
//! minutes: the rate limit is the point.
//!
//! In telephony mode recordings go in `finish` (the default) and are proven from the call
//! statistics right after the push, inside the measured pass; a second pass shows what is left
//! (nothing: its cost is counted in "calls/s with the recording check").
//! `--attach-record` sends every recording with attachRecord instead.

use std::time::Instant;

use chrono::Duration;
use ubsync::clock::Clock;
use ubsync::sim::{Bitrix24SimConfig, Scenario, Simulators};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of the largest waited-for child process, in MiB.
fn children_peak_rss_mib() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own; RUSAGE_CHILDREN covers waited children.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

/// Runs `ubsync sync` once; its stdout and how long it took, in seconds.
async fn sync_once(bin: &str, config: &std::path::Path) -> (String, f64) {
    let started = Instant::now();
    let out = tokio::process::Command::new(bin)
        .arg("-q")
        .arg("--config")
        .arg(config)
        .arg("sync")
        .output()
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        elapsed,
    )
}

/// Commands in the requests the portal answered with 200 (a batch counts its commands).
fn commands_in(reqs: &[ubsync::sim::bitrix24::LoggedRequest]) -> usize {
    reqs.iter()
        .filter(|r| r.status == 200)
        .map(|r| {
            if r.method == "batch" {
                r.commands.len()
            } else {
                1
            }
        })
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls = arg("--calls", 5000);
    let args: Vec<String> = std::env::args().collect();
    let mode = if args.iter().any(|a| a == "activity") {
        "activity"
    } else {
        "telephony"
    };
    let finish_link = !args.iter().any(|a| a == "--attach-record");
    let tz = chrono_tz::Europe::Kyiv;
    let clock = Clock::system();
    let day = (clock.now().with_timezone(&tz) - Duration::days(1)).date_naive();
    let scenario = Scenario::call_centre_day(tz, day, 20, calls, 42);
    let any = "127.0.0.1:0".parse().unwrap();
    let sims = Simulators::start(&scenario, Bitrix24SimConfig::default(), clock, any, any)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b24 = sims.bitrix24_url();
    let config = dir.path().join("ubsync.toml");
    std::fs::write(
        &config,
        format!(
            "[unitalk]\nbase_url = \"{}\"\napi_key = \"{}\"\n[bitrix24]\nmode = \"{mode}\"\nportal_url = \"{b24}\"\n\
             client_id = \"{}\"\nclient_secret = \"{}\"\noauth_url = \"{b24}\"\nwebhook_url = \"{b24}/rest/1/{}/\"\n\
             default_user_id = 1\nburst = 50\nper_second = 2\n\
             [sync]\nstart = \"{day}\"\nrecord_url_on_finish = {finish_link}\n",
            sims.unitalk_url(),
            ubsync::sim::unitalk::DEFAULT_API_KEY,
            ubsync::sim::bitrix24::DEFAULT_CLIENT_ID,
            ubsync::sim::bitrix24::DEFAULT_CLIENT_SECRET,
            ubsync::sim::bitrix24::DEFAULT_WEBHOOK_CODE,
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_ubsync");
    let (_, refresh) = sims.bitrix24.install_app(1);
    if mode == "telephony" {
        let st = tokio::process::Command::new(bin)
            .arg("-q")
            .arg("--config")
            .arg(&config)
            .args(["auth", "set-refresh-token"])
            .env("UBSYNC_REFRESH_TOKEN", &refresh)
            .status()
            .await
            .unwrap();
        assert!(st.success());
    }

    eprintln!("pushing {calls} calls in {mode} mode at burst 50, 2 requests/s ...");
    let before = sims.bitrix24.requests().len();
    let (summary, elapsed) = sync_once(bin, &config).await;
    let peak_rss = children_peak_rss_mib();

    let reqs = &sims.bitrix24.requests()[before..];
    let requests = reqs.iter().filter(|r| r.status == 200).count();
    let commands = commands_in(reqs);
    let refused = reqs.iter().filter(|r| r.status == 503).count();
    let pushed = match mode {
        "telephony" => sims.bitrix24.stats().len(),
        _ => sims.bitrix24.activities().len(),
    };
    // Sustained: at the portal, from 10 s after the first request to the last one.
    let is_write = |c: &str| {
        !(c.starts_with("user.")
            || c.contains(".list")
            || c.contains("search")
            || c.contains("findbycomm")
            || c.contains("statistic"))
    };
    let (first, last) = (reqs.first().unwrap().at, reqs.last().unwrap().at);
    let from = first + Duration::seconds(10);
    let late: Vec<_> = reqs
        .iter()
        .filter(|r| r.at >= from && r.status == 200)
        .collect();
    let span = (last - from).num_milliseconds().max(1) as f64 / 1000.0;
    let count = |f: &dyn Fn(&str) -> bool| -> usize {
        late.iter()
            .map(|r| {
                if r.method == "batch" {
                    r.commands.iter().filter(|c| f(c)).count()
                } else {
                    usize::from(f(&r.method))
                }
            })
            .sum()
    };
    let sustained_all = count(&|_| true) as f64 / span;
    let sustained_writes = count(&is_write) as f64 / span;
    let finished = count(&|c| c.ends_with("finish") || c == "crm.activity.add") as f64 / span;
    let per_request = count(&|_| true) as f64 / late.len().max(1) as f64;
    let tasks = sims.bitrix24.tasks().len();
    let cmd_rate = commands as f64 / elapsed;
    println!(
        "ubsync push benchmark ({} calls seeded, {} pushed, {} missed-call tasks)",
        calls, pushed, tasks
    );
    println!("  elapsed                      {elapsed:.1} s");
    println!(
        "  calls/s                      {:.1}",
        pushed as f64 / elapsed
    );
    println!("  Bitrix24 commands/s          {cmd_rate:.1}");
    println!(
        "  requests                     {requests} ({:.2}/s)",
        requests as f64 / elapsed
    );
    println!(
        "  commands per request         {:.1}",
        commands as f64 / requests.max(1) as f64
    );
    println!("  achieved / ceiling           {:.2} (ceiling 2 requests/s x 50 commands = 100 commands/s)", cmd_rate / 100.0);
    println!(
        "  sustained after 10 s         {:.2} of the ceiling ({sustained_all:.1} commands/s, {:.2} in write commands), {per_request:.1} commands/request, {finished:.1} calls/s",
        sustained_all / 100.0,
        sustained_writes / 100.0
    );
    // The cap every request must respect, measured with the portal's arrival times.
    let mut most_in_10s = 0;
    let mut lo = 0;
    for hi in 0..reqs.len() {
        while reqs[hi].at - reqs[lo].at >= Duration::seconds(10) {
            lo += 1;
        }
        most_in_10s = most_in_10s.max(hi - lo + 1);
    }
    println!("  503s received                {refused}");
    println!("  most requests in any 10 s    {most_in_10s} (the cap is 50)");
    println!("  peak RSS of ubsync           {peak_rss:.1} MiB");
    println!("  summary: {summary}");

    // The recording check of the calls this pass finished with their links (telephony).
    if mode == "telephony" && finish_link {
        let before = sims.bitrix24.requests().len();
        let (check_summary, check_elapsed) = sync_once(bin, &config).await;
        let reqs = &sims.bitrix24.requests()[before..];
        let check_commands = commands_in(reqs);
        println!(
            "  recording check (next pass)  {check_elapsed:.1} s, {} requests, {check_commands} commands",
            reqs.len()
        );
        println!(
            "  calls/s with the check       {:.1}",
            pushed as f64 / (elapsed + check_elapsed)
        );
        println!("  check summary: {check_summary}");
    }
}
