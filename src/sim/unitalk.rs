//! The Unitalk simulator: `POST /api/history/get`, `/api/users/list`, `/api/phones/inner`.
//!
//! Follows `unitalk-api.md`: POST with JSON bodies; `Authorization: <key>` or `Bearer <key>`;
//! errors as `{"status":"Error","message":...}` with HTTP 200 (as the ancestor did); history dates
//! are `YYYY-MM-DD HH:MM:SS` wall-clock in the account's zone, matched inclusively against the
//! call start; results newest first; `count` is the total for the whole query; `limit` above 1000
//! is rejected. A call appears only once it has ended, and its recording `link` only once the
//! recording is ready, which may be a later poll.
//!
//! `/phones/inner` is our choice of shape (the real endpoint is unconfirmed):
//! `{"count": n, "items": [{"number": "101", "status": "ONLINE", "userId": 500,
//! "updatedAt": "YYYY-MM-DD HH:MM:SS"}]}`. `/users/list` answers `{"count": n, "items": [...]}` with
//! `line` as a JSON number when it is all digits, as live data has it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Duration, NaiveDateTime, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

use super::scenario::{Operator, Scenario, SimCall};
use crate::clock::Clock;
use crate::timezone::local_to_utc;

/// The API key the simulator accepts unless told otherwise.
pub const DEFAULT_API_KEY: &str = "sim-unitalk-key";

/// A fault the next matching request suffers.
#[derive(Debug, Clone)]
pub enum UnitalkFault {
    /// `{"status":"Error","message":"Internal error"}` with HTTP 200.
    InternalError,
    /// `{"status":"Error","message":<this>}` with HTTP 200.
    Error(String),
    /// An HTTP status with an HTML body.
    Http(u16),
    /// Answer after this delay.
    Delay(std::time::Duration),
}

/// How `/history/get` pages, for the independent-server behaviours ubsync must survive: a
/// server that caps pages below the requested `limit`, reports a wrong, missing or non-numeric
/// `count`, or ignores `offset`.
#[derive(Debug, Clone, Default)]
pub struct Paging {
    /// Serve at most this many records per page, whatever `limit` asks.
    pub page_cap: Option<usize>,
    pub count: CountMode,
    /// Answer every page as if `offset` were 0.
    pub ignore_offset: bool,
}

/// What `/history/get` says in `count`.
#[derive(Debug, Clone, Default)]
pub enum CountMode {
    /// The true total.
    #[default]
    True,
    /// No `count` field.
    Missing,
    /// `"count": "many"`.
    NonNumeric,
    /// The true total minus this much.
    Less(usize),
    /// The true total plus 1000 per request served so far (it never stops growing).
    Growing,
}

/// An inner line and its current status.
#[derive(Debug, Clone)]
pub struct InnerLine {
    pub number: String,
    pub status: String,
    pub user_id: Option<u64>,
    pub updated_at: NaiveDateTime,
}

/// One request the simulator answered.
#[derive(Debug, Clone)]
pub struct UnitalkRequest {
    pub path: String,
    pub body: Value,
    pub authorized: bool,
}

struct UnitalkState {
    api_key: String,
    tz: Tz,
    calls: Vec<SimCall>,
    users: Vec<Operator>,
    lines: Vec<InnerLine>,
    faults: VecDeque<(Option<String>, UnitalkFault)>,
    requests: Vec<UnitalkRequest>,
    /// Calls that land right after the n-th `/history/get` request is answered.
    arrivals: Vec<(usize, SimCall)>,
    paging: Paging,
    /// Calls whose webhooks were delivered.
    delivered: std::collections::HashSet<u64>,
    /// How `/phones/directCall` behaves.
    direct: DirectCallMode,
    /// Whether the call a `directCall` makes carries its `meta` in history.
    echo_meta: bool,
    /// The `directCall` requests received: (sip, number, meta).
    direct_calls: Vec<(String, String, String)>,
}

/// How `/phones/directCall` answers.
#[derive(Debug, Clone, Default)]
pub enum DirectCallMode {
    /// The operator and the client talk for `talk` seconds; the call shows in history when it
    /// ends (`OUT`, `from` = the line, `to` = [number]).
    #[default]
    Answered,
    /// The client does not pick up (`NOANSWER`).
    NoAnswer,
    /// Nothing happens: nobody picks up and no call is recorded.
    Silent,
    /// `{"status":"Error","message":...}`.
    Refuse(String),
}

/// Handle to a running (or runnable) Unitalk simulator.
#[derive(Clone)]
pub struct UnitalkSim {
    state: Arc<Mutex<UnitalkState>>,
    clock: Clock,
}

impl UnitalkSim {
    pub fn new(scenario: &Scenario, clock: Clock) -> Self {
        let now_local = clock.now().with_timezone(&scenario.timezone).naive_local();
        let lines = scenario
            .operators
            .iter()
            .map(|o| InnerLine {
                number: o.inner_line.clone(),
                status: "ONLINE".into(),
                user_id: Some(o.unitalk_user_id),
                updated_at: now_local,
            })
            .collect();
        Self {
            state: Arc::new(Mutex::new(UnitalkState {
                api_key: DEFAULT_API_KEY.into(),
                tz: scenario.timezone,
                calls: scenario.calls.clone(),
                users: scenario.operators.clone(),
                lines,
                faults: VecDeque::new(),
                requests: Vec::new(),
                arrivals: Vec::new(),
                paging: Paging::default(),
                delivered: Default::default(),
                direct: DirectCallMode::default(),
                echo_meta: false,
                direct_calls: Vec::new(),
            })),
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UnitalkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ended calls whose webhooks were not delivered yet (marked delivered now), with their
    /// `date` as Unitalk writes it.
    pub(crate) fn take_undelivered(&self) -> Vec<(SimCall, String)> {
        let now = self.clock.now();
        let mut st = self.lock();
        let tz = st.tz;
        let due: Vec<SimCall> = st
            .calls
            .iter()
            .filter(|c| call_end(c, tz) <= now && !st.delivered.contains(&c.id))
            .cloned()
            .collect();
        for c in &due {
            st.delivered.insert(c.id);
        }
        due.into_iter()
            .map(|c| {
                let d = c.date.format("%Y-%m-%d %H:%M:%S").to_string();
                (c, d)
            })
            .collect()
    }

    /// Sets how `/phones/directCall` answers.
    pub fn set_direct_call(&self, mode: DirectCallMode) {
        self.lock().direct = mode;
    }

    /// Makes the calls `directCall` places carry its `meta` in history (and webhooks).
    pub fn set_echo_meta(&self, on: bool) {
        self.lock().echo_meta = on;
    }

    /// The `directCall` requests received: (sip, number, meta).
    pub fn direct_calls(&self) -> Vec<(String, String, String)> {
        self.lock().direct_calls.clone()
    }

    /// Forgets which calls' webhooks were delivered (the next round sends them all again).
    pub fn forget_delivered(&self) {
        self.lock().delivered.clear();
    }

    /// Changes how `/history/get` pages (see [`Paging`]).
    pub fn set_paging(&self, paging: Paging) {
        self.lock().paging = paging;
    }

    pub fn set_api_key(&self, key: &str) {
        self.lock().api_key = key.into();
    }

    /// Adds calls (they still appear only once ended).
    pub fn add_calls(&self, calls: impl IntoIterator<Item = SimCall>) {
        self.lock().calls.extend(calls);
    }

    /// Makes `calls` land in the history right after the `n`-th `/history/get` request (counted
    /// from the start) has been answered: how tests reproduce calls arriving mid-paging.
    pub fn add_calls_after_history_request(
        &self,
        n: usize,
        calls: impl IntoIterator<Item = SimCall>,
    ) {
        let mut st = self.lock();
        st.arrivals.extend(calls.into_iter().map(|c| (n, c)));
    }

    /// Changes a call in place, e.g. to correct its duration.
    pub fn update_call(&self, id: u64, f: impl FnOnce(&mut SimCall)) {
        if let Some(c) = self.lock().calls.iter_mut().find(|c| c.id == id) {
            f(c);
        }
    }

    /// Sets an inner line's status as of now.
    pub fn set_line_status(&self, number: &str, status: &str) {
        let now = self.clock.now();
        let mut st = self.lock();
        let local = now.with_timezone(&st.tz).naive_local();
        match st.lines.iter_mut().find(|l| l.number == number) {
            Some(l) => {
                l.status = status.into();
                l.updated_at = local;
            }
            None => st.lines.push(InnerLine {
                number: number.into(),
                status: status.into(),
                user_id: None,
                updated_at: local,
            }),
        }
    }

    /// Makes the next request to `path` (any path when `None`) suffer `fault`.
    pub fn inject(&self, path: Option<&str>, fault: UnitalkFault) {
        self.lock()
            .faults
            .push_back((path.map(str::to_string), fault));
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<UnitalkRequest> {
        self.lock().requests.clone()
    }

    pub fn router(&self) -> Router {
        // The API lives under `/api` on the real host; the bare paths are served too, for clients
        // configured with the simulator's root as their base.
        Router::new()
            .route("/api/history/get", post(history_get))
            .route("/api/users/list", post(users_list))
            .route("/api/phones/inner", post(phones_inner))
            .route("/api/phones/directCall", post(direct_call))
            .route("/phones/directCall", post(direct_call))
            .route("/history/get", post(history_get))
            .route("/users/list", post(users_list))
            .route("/phones/inner", post(phones_inner))
            .layer(axum::middleware::map_response_with_state(
                self.clock.clone(),
                |axum::extract::State(clock): axum::extract::State<Clock>, mut r: Response| async move {
                    // The server's own time, as a real server's `Date` header gives it.
                    let at = std::time::SystemTime::from(clock.now());
                    if let Ok(v) = httpdate::fmt_http_date(at).parse() {
                        r.headers_mut().insert("date", v);
                    }
                    r
                },
            ))
            .with_state(self.clone())
    }

    fn visible(&self, call: &SimCall, tz: Tz, now: DateTime<Utc>) -> bool {
        call_end(call, tz) <= now
    }
}

fn call_end(call: &SimCall, tz: Tz) -> DateTime<Utc> {
    local_to_utc(call.date, tz) + Duration::seconds(call.seconds_full as i64)
}

fn error(message: &str) -> Response {
    Json(json!({"status": "Error", "message": message})).into_response()
}

/// Checks auth and faults and logs the request. `Err` is the response to send instead.
async fn admit(
    sim: &UnitalkSim,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
) -> Result<(), Response> {
    let fault = {
        let mut st = sim.lock();
        let pos = st
            .faults
            .iter()
            .position(|(p, _)| p.as_deref().is_none_or(|p| path.ends_with(p)));
        pos.and_then(|i| st.faults.remove(i)).map(|(_, f)| f)
    };
    match fault {
        Some(UnitalkFault::InternalError) => return Err(error("Internal error")),
        Some(UnitalkFault::Error(message)) => return Err(error(&message)),
        Some(UnitalkFault::Http(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            return Err((
                status,
                [("content-type", "text/html")],
                "<html><body><h1>Bad Gateway</h1></body></html>",
            )
                .into_response());
        }
        Some(UnitalkFault::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    let mut st = sim.lock();
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string());
    let authorized = given.as_deref() == Some(st.api_key.as_str());
    st.requests.push(UnitalkRequest {
        path: path.into(),
        body: body.clone(),
        authorized,
    });
    if !authorized {
        return Err(error("Authorization invalid"));
    }
    Ok(())
}

/// A request body as JSON whatever its content type; a form body is read as PHP would.
fn body_value(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::Object(crate::phpquery::parse(&String::from_utf8_lossy(body))))
}

fn parse_date(v: Option<&Value>) -> Option<NaiveDateTime> {
    NaiveDateTime::parse_from_str(v?.as_str()?, "%Y-%m-%d %H:%M:%S").ok()
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

async fn history_get(State(sim): State<UnitalkSim>, headers: HeaderMap, body: Bytes) -> Response {
    let body = body_value(&body);
    if let Err(r) = admit(&sim, "/history/get", &headers, &body).await {
        return r;
    }
    let Some(from) = parse_date(body.get("dateFrom")) else {
        return error("Wrong FROM date");
    };
    let Some(to) = parse_date(body.get("dateTo")) else {
        return error("Wrong TO date");
    };
    let limit = match int(body.get("limit")) {
        Some(l) if (1..=1000).contains(&l) => l as usize,
        _ => return error("Limit range is 1-1000"),
    };
    let offset = match int(body.get("offset")).unwrap_or(0) {
        o if o >= 0 => o as usize,
        _ => return error("Offset is less than 0"),
    };
    let filter = body.get("filter").cloned().unwrap_or(Value::Null);
    let now = sim.clock.now();
    let st = sim.lock();
    let mut matching: Vec<&SimCall> = st
        .calls
        .iter()
        .filter(|c| c.date >= from && c.date <= to)
        .filter(|c| sim.visible(c, st.tz, now))
        .filter(|c| match filter.get("direction").and_then(Value::as_str) {
            Some(d) => c.direction.eq_ignore_ascii_case(d),
            None => true,
        })
        .filter(|c| match filter.get("answered").and_then(Value::as_bool) {
            Some(a) => (c.state == "ANSWER") == a,
            None => true,
        })
        .collect();
    matching.sort_by(|a, b| b.date.cmp(&a.date).then(b.id.cmp(&a.id)));
    let count = matching.len();
    let paging = st.paging.clone();
    let limit = paging.page_cap.map_or(limit, |cap| limit.min(cap));
    let offset = if paging.ignore_offset { 0 } else { offset };
    let calls: Vec<Value> = matching
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|c| render_call(c, st.tz, now))
        .collect();
    let served_before = st
        .requests
        .iter()
        .filter(|r| r.path == "/history/get")
        .count();
    drop(st);
    let mut st = sim.lock();
    let served = st
        .requests
        .iter()
        .filter(|r| r.path == "/history/get")
        .count();
    let (now_due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut st.arrivals)
        .into_iter()
        .partition(|(n, _)| *n <= served);
    st.arrivals = later;
    st.calls.extend(now_due.into_iter().map(|(_, c)| c));
    let mut answer = json!({"calls": calls, "warning": null});
    match paging.count {
        CountMode::True => answer["count"] = json!(count),
        CountMode::Missing => {}
        CountMode::NonNumeric => answer["count"] = json!("many"),
        CountMode::Less(k) => answer["count"] = json!(count.saturating_sub(k)),
        CountMode::Growing => answer["count"] = json!(count + 1000 * served_before),
    }
    Json(answer).into_response()
}

fn render_call(c: &SimCall, tz: Tz, now: DateTime<Utc>) -> Value {
    if let Some(raw) = &c.raw_override {
        return raw.clone();
    }
    let mut v = json!({
        "id": c.id,
        "date": c.date.format("%Y-%m-%d %H:%M:%S").to_string(),
        "direction": c.direction,
        "from": c.from,
        "to": c.to,
        "outerNumber": c.outer_number,
        "secondsFullTime": c.seconds_full,
        "secondsTalk": c.seconds_talk,
        "state": c.state,
        "cause": c.cause,
        "callback": false,
        "source": c.source,
    });
    if c.older_format {
        v["state"] = Value::Null;
        v["secondsFullTime"] = Value::Null;
        if c.seconds_talk == 0 {
            v["secondsTalk"] = Value::Null;
        }
    }
    if let Some(g) = &c.group {
        v["lastGroupName"] = Value::String(g.clone());
    }
    if let Some(m) = &c.meta {
        v["meta"] = Value::String(m.clone());
    }
    if let Some(link) = &c.link {
        if call_end(c, tz) + c.link_delay <= now {
            v["link"] = Value::String(link.clone());
        }
    }
    v
}

async fn direct_call(State(sim): State<UnitalkSim>, headers: HeaderMap, body: Bytes) -> Response {
    let body = body_value(&body);
    if let Err(r) = admit(&sim, "/phones/directCall", &headers, &body).await {
        return r;
    }
    let text = |k: &str| match body.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let (sip, number, meta) = (text("sip"), text("number"), text("meta"));
    let now = sim.clock.now();
    let mut st = sim.lock();
    st.direct_calls
        .push((sip.clone(), number.clone(), meta.clone()));
    let echoed = st.echo_meta.then_some(meta).filter(|m| !m.is_empty());
    if sip.is_empty() || number.is_empty() {
        return error("sip and number are required");
    }
    let state = match st.direct.clone() {
        DirectCallMode::Refuse(m) => return error(&m),
        DirectCallMode::Silent => {
            return Json(json!({"status": "Success", "result": "{}"})).into_response()
        }
        DirectCallMode::Answered => "ANSWER",
        DirectCallMode::NoAnswer => "NOANSWER",
    };
    let id = st
        .calls
        .iter()
        .map(|c| c.id)
        .max()
        .unwrap_or(1000)
        .max(900_000)
        + 1;
    let talk = if state == "ANSWER" { 30 } else { 0 };
    let outer = st
        .calls
        .first()
        .map(|c| c.outer_number.clone())
        .unwrap_or_else(|| "380443334455".into());
    // The call has just ended: it is in history (and its webhook can be sent) at once.
    let date = (now - Duration::seconds(talk as i64 + 10))
        .with_timezone(&st.tz)
        .naive_local();
    st.calls.push(SimCall {
        id,
        date,
        direction: "OUT".into(),
        from: sip,
        to: vec![number],
        outer_number: outer,
        seconds_full: talk + 10,
        seconds_talk: talk,
        state: state.into(),
        cause: Some(16),
        link: (talk > 0).then(|| format!("https://rec/dc-{id}.mp3")),
        link_delay: Duration::zero(),
        source: "REGULAR".into(),
        raw_override: None,
        older_format: false,
        group: None,
        meta: echoed,
    });
    Json(json!({"status": "Success", "result": format!("{{\"phonecall_id\": {id}}}")}))
        .into_response()
}

async fn users_list(State(sim): State<UnitalkSim>, headers: HeaderMap, body: Bytes) -> Response {
    let body = body_value(&body);
    if let Err(r) = admit(&sim, "/users/list", &headers, &body).await {
        return r;
    }
    let st = sim.lock();
    let items: Vec<Value> = st
        .users
        .iter()
        .map(|u| {
            let line = match u.inner_line.parse::<u64>() {
                Ok(n) => json!(n),
                Err(_) => json!(u.inner_line),
            };
            json!({"id": u.unitalk_user_id, "firstName": u.first_name, "lastName": u.last_name,
                   "line": line, "email": u.email})
        })
        .collect();
    Json(json!({"count": items.len(), "items": items})).into_response()
}

async fn phones_inner(State(sim): State<UnitalkSim>, headers: HeaderMap, body: Bytes) -> Response {
    let body = body_value(&body);
    if let Err(r) = admit(&sim, "/phones/inner", &headers, &body).await {
        return r;
    }
    let st = sim.lock();
    let items: Vec<Value> = st
        .lines
        .iter()
        .map(|l| {
            json!({"number": l.number, "status": l.status, "userId": l.user_id,
                   "updatedAt": l.updated_at.format("%Y-%m-%d %H:%M:%S").to_string()})
        })
        .collect();
    Json(json!({"count": items.len(), "items": items})).into_response()
}
