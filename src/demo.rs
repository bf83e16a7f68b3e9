//! `ubsync demo`: the whole pipeline over real HTTP against the simulators, then a check of the
//! simulated portal against what the seeded day should produce.
//!
//! The expectations are computed here from the scenario alone, independently of `sync`, so the
//! demo verifies the pipeline rather than repeating it.

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{Duration, NaiveDate, NaiveTime, Offset, TimeZone};
use chrono_tz::Tz;

use crate::bitrix24::Bitrix24Client;
use crate::clock::Clock;
use crate::config::{Config, Env};
use crate::sim::scenario::{Scenario, SimCall};
use crate::sim::{Bitrix24SimConfig, Simulators};
use crate::store::{SharedStore, Store};
use crate::sync::{run_pass, PassOptions, PassSummary, SyncCtx};
use crate::unitalk::UnitalkClient;

/// The outcome of a demo run.
pub struct DemoReport {
    pub text: String,
    pub ok: bool,
}

/// The most recent day before `today` on which `tz` changed its offset.
pub fn last_dst_change(tz: Tz, today: NaiveDate) -> Option<NaiveDate> {
    (1..400).map(|d| today - Duration::days(d)).find(|d| {
        let offset = |h| {
            tz.from_local_datetime(&d.and_time(NaiveTime::from_hms_opt(h, 0, 0).expect("valid")))
                .earliest()
                .map(|t| t.offset().fix())
        };
        offset(0) != offset(23)
    })
}

fn expected_number(raw: &str) -> String {
    if let Some(national) = raw.strip_prefix('0') {
        format!("+380{national}")
    } else {
        format!("+{raw}")
    }
}

fn expected_code(state: &str) -> &'static str {
    match state {
        "ANSWER" => "200",
        "NOANSWER" => "304",
        "BUSY" | "BUSYOUT" => "486",
        "FAIL" => "603",
        "CHANUNAVAIL" | "UNREACHABLE" => "480",
        "NOMONEY" => "402",
        "WRONGDIR" => "484",
        "BLOCKED" => "423",
        "NOT_EXIST" => "404",
        _ => "OTHER",
    }
}

/// Builds the demo's scenario: a DST-change day and an ordinary day (yesterday).
pub fn scenario(tz: Tz, today: NaiveDate) -> (Scenario, Vec<NaiveDate>) {
    let yesterday = today - Duration::days(1);
    let edge = last_dst_change(tz, yesterday).unwrap_or(yesterday - Duration::days(7));
    // Enough calls for more requests than the bucket holds, so the rate limit is exercised.
    let mut s = Scenario::call_centre_day(tz, yesterday, 20, 700, 8);
    let edge_day = Scenario::call_centre_day(tz, edge, 20, 150, 7);
    s.calls.extend(edge_day.calls);
    // Calls inside the hour that repeats (autumn) or early on the change day.
    let op = s.operators[0].inner_line.clone();
    for (h, m) in [(3, 10), (3, 40), (4, 20)] {
        let at = edge.and_time(NaiveTime::from_hms_opt(h, m, 0).expect("valid"));
        if tz.from_local_datetime(&at).earliest().is_some() {
            s.add_call(
                at,
                "IN",
                "380671234567",
                &[&op],
                "ANSWER",
                42,
                Some("https://api.unitalk.cloud:8443/tracking/rec/1.1/dst"),
            );
        }
    }
    s.calls.sort_by_key(|c| (c.date, c.id));
    (s, vec![edge, yesterday])
}

/// Runs the demo: simulators, two passes, checks.
pub async fn run(clock: Clock) -> anyhow::Result<DemoReport> {
    let tz = chrono_tz::Europe::Kyiv;
    let today = clock.now().with_timezone(&tz).date_naive();
    let (scenario, days) = scenario(tz, today);
    let loopback = "127.0.0.1:0".parse().expect("valid address");
    let sims = Simulators::start(
        &scenario,
        Bitrix24SimConfig::default(),
        clock.clone(),
        loopback,
        loopback,
    )
    .await?;
    let dir = std::env::temp_dir().join(format!(
        "ubsync-demo-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    let b24 = sims.bitrix24_url();
    let toml = format!(
        "[unitalk]\nbase_url = \"{}\"\napi_key = \"{}\"\ntimezone = \"{tz}\"\n\
         [bitrix24]\nmode = \"telephony\"\nportal_url = \"{b24}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\
         oauth_url = \"{b24}\"\ndefault_user_id = {}\nburst = 50\nper_second = 2\n\
         [state]\npath = \"demo.db\"\n[sync]\nstart = \"{} 00:00:00\"\nmax_window = \"12h\"\n",
        sims.unitalk_url(),
        crate::sim::unitalk::DEFAULT_API_KEY,
        crate::sim::bitrix24::DEFAULT_CLIENT_ID,
        crate::sim::bitrix24::DEFAULT_CLIENT_SECRET,
        scenario.admin_user_id,
        days[0],
    );
    let cfg = Config::parse(&toml, &dir.join("demo.toml"), &Env::default())?;
    let store = SharedStore::new(Store::open(&cfg.state.path)?);
    let b24_client = Bitrix24Client::new(&cfg.bitrix24, store.clone(), clock.clone())?;
    let (_, refresh) = sims.bitrix24.install_app(scenario.admin_user_id);
    b24_client.exchange(&refresh).await?;
    let ctx = SyncCtx {
        unitalk: UnitalkClient::new(&cfg.unitalk)?,
        b24: b24_client,
        recordings: crate::recording::client(&cfg),
        cfg,
        store,
        clock,
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let first = run_pass(&ctx, &PassOptions::default()).await?;
    let second = run_pass(&ctx, &PassOptions::default()).await?;
    let (checks, ok) = check(&scenario, &sims, &first, &second);
    let mut text = String::new();
    let _ = writeln!(
        text,
        "ubsync demo: {} operators, {} CRM clients, {} calls on {} (DST change) and {} ({tz})",
        scenario.operators.len(),
        scenario.crm.len(),
        scenario.calls.len(),
        days[0],
        days[1]
    );
    let _ = writeln!(text, "  pass 1: {first}");
    let _ = writeln!(text, "  pass 2: {second}");
    let _ = writeln!(text, "  checks:");
    for c in checks {
        let _ = writeln!(text, "    {c}");
    }
    let refused = sims
        .bitrix24
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    let waited = ctx
        .b24
        .budget
        .waited_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let waited_s = ctx
        .b24
        .budget
        .waited_ms
        .load(std::sync::atomic::Ordering::Relaxed) as f64
        / 1000.0;
    let _ = writeln!(
        text,
        "  portal: {} requests, {refused} rate-limit refusals (limits: burst 50, 2 requests/s); {waited} requests waited for the rate limit ({waited_s:.1} s in all)",
        sims.bitrix24.requests().len()
    );
    let _ = writeln!(text, "{}", if ok { "demo passed" } else { "demo FAILED" });
    sims.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DemoReport { text, ok })
}

/// The client of a pushed call as ubsync reads it.
fn client_of(c: &SimCall) -> String {
    match c.direction.as_str() {
        "OUT" => expected_number(c.to.first().map(String::as_str).unwrap_or("")),
        _ => expected_number(&c.from),
    }
}

/// Checks missed-call tasks with one open task per client (the defaults): every missed incoming
/// call is in exactly one task — its own (`XML_ID`, for `responsible`) or folded into its
/// client's task (named in the description)
/// after it; a task whose client was reached after its last call is completed; no client has
/// two open tasks. Returns whether it holds and a line saying so.
pub fn check_tasks(
    pushed: &[&SimCall],
    tasks: &[crate::sim::bitrix24::Task],
    responsible: impl Fn(&SimCall) -> Option<u64>,
) -> (bool, String) {
    let names = |t: &crate::sim::bitrix24::Task, id: u64| {
        let ext = format!("unitalk-{id}");
        t.xml_id.as_deref() == Some(ext.as_str())
            || t.description.match_indices(&ext).any(|(i, _)| {
                !t.description[i + ext.len()..]
                    .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
    };
    let reached_after = |client: &str, after: chrono::NaiveDateTime| {
        pushed
            .iter()
            .any(|x| x.state == "ANSWER" && x.date > after && client_of(x) == client)
    };
    let mut problems = Vec::new();
    let mut owned = 0;
    let mut folded = 0;
    let mut open_by_client: HashMap<String, u32> = HashMap::new();
    for c in pushed
        .iter()
        .filter(|c| c.direction == "IN" && c.state != "ANSWER")
    {
        let ext = format!("unitalk-{}", c.id);
        let own: Vec<_> = tasks
            .iter()
            .filter(|t| t.xml_id.as_deref() == Some(ext.as_str()))
            .collect();
        let named = tasks.iter().filter(|t| names(t, c.id)).count();
        match (own.len(), named) {
            (1, 1) => {
                owned += 1;
                let t = own[0];
                if responsible(c).is_some_and(|r| r != t.responsible_id) {
                    problems.push(format!("call {}: task for user {}", c.id, t.responsible_id));
                }
                let last = pushed
                    .iter()
                    .filter(|x| names(t, x.id))
                    .map(|x| x.date)
                    .max()
                    .unwrap_or(c.date);
                if reached_after(&client_of(c), last) && t.status != 5 {
                    problems.push(format!(
                        "call {}: client reached but task {} open",
                        c.id, t.id
                    ));
                }
                if t.status != 5 {
                    *open_by_client.entry(client_of(c)).or_default() += 1;
                }
            }
            (0, 1) => folded += 1,
            (o, n) => problems.push(format!("call {}: {o} own tasks, named in {n}", c.id)),
        }
    }
    for (client, n) in open_by_client {
        if n > 1 {
            problems.push(format!("{client}: {n} open tasks"));
        }
    }
    if tasks.len() != owned {
        problems.push(format!("{} tasks for {owned} owning calls", tasks.len()));
    }
    (
        problems.is_empty(),
        format!(
            "{} missed-call tasks for the right person ({folded} repeat calls folded in; problems: {problems:?})",
            tasks.len()
        ),
    )
}

/// Checks the simulated portal against what `s` should produce in telephony mode (every call
/// once with the right facts, recordings, one task per missed call for the right person) and
/// that the second pass changed nothing. Returns one line per check and whether all passed.
pub fn check(
    s: &Scenario,
    sims: &Simulators,
    first: &PassSummary,
    second: &PassSummary,
) -> (Vec<String>, bool) {
    let tz = s.timezone;
    let op_user: HashMap<&str, u64> = s
        .operators
        .iter()
        .map(|o| (o.inner_line.as_str(), o.b24_user_id))
        .collect();
    let crm: HashMap<String, u64> = s
        .crm
        .iter()
        .map(|c| (c.phone.clone(), c.responsible_id))
        .collect();
    let stats = sims.bitrix24.stats();
    let tasks = sims.bitrix24.tasks();
    let is_op = |n: &str| op_user.contains_key(n);
    let internal = |c: &SimCall| {
        c.direction == "INNER"
            || (is_op(&c.from) && !c.to.is_empty() && c.to.iter().all(|t| is_op(t)))
    };
    let pushed: Vec<&SimCall> = s.calls.iter().filter(|c| !internal(c)).collect();
    let mut results = Vec::new();
    let mut ok = true;
    let mut verdict = |good: bool, text: String| {
        ok &= good;
        results.push(format!("{} {text}", if good { "ok  " } else { "FAIL" }));
    };

    let mut missing = Vec::new();
    let mut dupes = Vec::new();
    let mut wrong = Vec::new();
    let mut recordings = 0;
    for c in &pushed {
        let ext = format!("unitalk-{}", c.id);
        let rows: Vec<_> = stats
            .iter()
            .filter(|r| r.external_call_id.as_deref() == Some(ext.as_str()))
            .collect();
        match rows.len() {
            0 => missing.push(c.id),
            1 => {}
            _ => dupes.push(c.id),
        }
        let Some(r) = rows.first() else { continue };
        let (client, user) = match c.direction.as_str() {
            "OUT" => (
                expected_number(&c.to[0]),
                op_user
                    .get(c.from.as_str())
                    .copied()
                    .unwrap_or(s.admin_user_id),
            ),
            _ => (
                expected_number(&c.from),
                c.to.first()
                    .and_then(|t| op_user.get(t.as_str()).copied())
                    .unwrap_or(s.admin_user_id),
            ),
        };
        let start = tz
            .from_local_datetime(&c.date)
            .earliest()
            .map(|t| t.fixed_offset());
        let good = r.phone == client
            && r.call_type == if c.direction == "OUT" { 1 } else { 2 }
            && r.duration == c.seconds_talk as i64
            && r.status_code == expected_code(&c.state)
            && Some(r.start) == start
            && r.portal_user_id == user;
        if !good {
            wrong.push(c.id);
        }
        if let Some(link) = &c.link {
            // The file, not only the URL finish was given (which a portal may not download).
            if r.record_url.as_deref() == Some(link.as_str()) && r.record_file_id.is_some() {
                recordings += 1;
            } else {
                wrong.push(c.id);
            }
        }
    }
    verdict(
        missing.is_empty() && dupes.is_empty() && stats.len() == pushed.len(),
        format!(
            "{} calls in Bitrix24 telephony exactly once ({} internal calls skipped; missing {:?}, duplicated {:?})",
            stats.len(),
            s.calls.len() - pushed.len(),
            missing,
            dupes
        ),
    );
    verdict(wrong.is_empty(), format!("directions, numbers, start times, talk times, status codes, operators and recordings match (wrong: {wrong:?})"));
    let expected_recordings = pushed.iter().filter(|c| c.link.is_some()).count();
    verdict(
        recordings == expected_recordings,
        format!("{recordings} of {expected_recordings} recordings attached"),
    );

    let tasks_ok = check_tasks(&pushed, &tasks, |c| {
        Some(
            crm.get(&expected_number(&c.from))
                .copied()
                .or_else(|| c.to.first().and_then(|t| op_user.get(t.as_str()).copied()))
                .unwrap_or(s.admin_user_id),
        )
    });
    verdict(tasks_ok.0, tasks_ok.1);
    verdict(
        second.pushed == 0 && second.tasks == 0 && second.bitrix24_requests == 0,
        format!(
            "second pass changed nothing ({} Bitrix24 requests)",
            second.bitrix24_requests
        ),
    );
    verdict(
        first.quarantined == 0,
        format!("{} calls quarantined", first.quarantined),
    );
    (results, ok)
}
