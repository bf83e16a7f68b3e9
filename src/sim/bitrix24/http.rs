//! The portal's HTTP face: the REST route (both URL forms, GET, form and JSON bodies, `.json`
//! suffixes, case-insensitive names), batch `$result[...]` references, error and HTML pages,
//! and the OAuth token server.

use super::*;

pub(super) fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64().unwrap_or(0) != 0,
        Value::String(s) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "y" | "yes"
        ),
        _ => false,
    }
}

/// A parameter by name, ignoring case (Bitrix24's handlers upper-case their parameter keys).
pub(crate) fn get_ci<'a>(params: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    params.get(key).or_else(|| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

pub(super) fn normalize_method(m: &str) -> String {
    let m = m.trim().trim_matches('/');
    let m = m.strip_suffix(".json").unwrap_or(m);
    m.to_lowercase()
}

/// Replaces `$result[key][field]...` in every string leaf with the referenced earlier result.
/// An unresolvable reference stays as written, as on a real portal (the command then fails).
pub(super) fn substitute_refs(params: &mut Map<String, Value>, results: &Map<String, Value>) {
    fn walk(v: &mut Value, results: &Map<String, Value>, re: &regex::Regex) {
        match v {
            Value::String(s) if s.contains("$result[") => {
                let replaced = re.replace_all(s, |caps: &regex::Captures| {
                    let mut cur = results.get(&caps[1]);
                    for seg in caps[2]
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .split("][")
                        .filter(|x| !x.is_empty())
                    {
                        cur = cur.and_then(|c| match c {
                            Value::Object(m) => m.get(seg),
                            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
                            _ => None,
                        });
                    }
                    match cur {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Number(n)) => n.to_string(),
                        Some(Value::Bool(b)) => {
                            if *b {
                                "1".into()
                            } else {
                                String::new()
                            }
                        }
                        _ => caps[0].to_string(),
                    }
                });
                *s = replaced.into_owned();
            }
            Value::Object(m) => m.values_mut().for_each(|x| walk(x, results, re)),
            Value::Array(a) => a.iter_mut().for_each(|x| walk(x, results, re)),
            _ => {}
        }
    }
    let re = regex::Regex::new(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)").expect("valid regex");
    for v in params.values_mut() {
        walk(v, results, &re);
    }
}

/// Query string and body merged into one parameter map.
pub(super) fn request_params(
    query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Map<String, Value> {
    let mut params = query.map(phpquery::parse).unwrap_or_default();
    if body.is_empty() {
        return params;
    }
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let from_body = if ctype.contains("json") || body.first() == Some(&b'{') {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    } else {
        phpquery::parse(&String::from_utf8_lossy(body))
    };
    params.extend(from_body);
    params
}

pub(super) fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(e.body())).into_response()
}

pub(super) fn html_page(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [("content-type", "text/html; charset=UTF-8")],
        format!("<!DOCTYPE html><html><head><title>{status}</title></head><body><h1>{status}</h1><p>nginx</p></body></html>"),
    )
        .into_response()
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn rest(
    State(sim): State<Bitrix24Sim>,
    Extension(kill): Extension<ConnectionKill>,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    _method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = sim.clock.now();
    let mut params = request_params(query.as_deref(), &headers, &body);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (webhook, method) = match segments.as_slice() {
        [m] => (None, normalize_method(m)),
        [user, code, m] => (
            Some((user.parse::<u64>().unwrap_or(0), code.to_string())),
            normalize_method(m),
        ),
        _ => {
            return error_response(&ApiError::new(
                404,
                "ERROR_METHOD_NOT_FOUND",
                "Method not found!",
            ))
        }
    };
    let commands: Vec<String> = if method == "batch" {
        match get_ci(&params, "cmd") {
            Some(Value::Object(m)) => m
                .values()
                .map(|v| normalize_method(scalar(v).split('?').next().unwrap_or("")))
                .collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| normalize_method(scalar(v).split('?').next().unwrap_or("")))
                .collect(),
            _ => Vec::new(),
        }
    } else {
        Vec::new()
    };

    let (response, after) = {
        let mut st = sim.lock();
        let fault = st.take_fault(&method, &commands);
        let mut log = LoggedRequest {
            at: now,
            method: method.clone(),
            commands: commands.clone(),
            status: 200,
            error: None,
            via_webhook: webhook.is_some(),
        };
        let outcome = handle(&mut st, &mut params, webhook, &method, fault.as_ref(), now);
        let response = match &outcome {
            Ok(body) => (StatusCode::OK, Json(body.clone())).into_response(),
            Err(Handled::Api(e)) => {
                log.status = e.status;
                log.error = Some(e.code.clone());
                error_response(e)
            }
            Err(Handled::Html(code)) => {
                log.status = *code;
                log.error = Some("HTML".into());
                html_page(*code)
            }
        };
        st.log.push(log);
        (response, fault)
    };
    match after {
        Some(FaultKind::CommitThenDrop) => {
            kill.kill();
            std::future::pending::<()>().await;
            unreachable!()
        }
        Some(FaultKind::Slow(d)) => {
            tokio::time::sleep(d).await;
            response
        }
        Some(FaultKind::CommitThenAnswer { status, body }) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            [("content-type", "application/json; charset=utf-8")],
            body,
        )
            .into_response(),
        _ => response,
    }
}

pub(super) enum Handled {
    Api(ApiError),
    Html(u16),
}

pub(super) fn handle(
    st: &mut PortalState,
    params: &mut Map<String, Value>,
    webhook: Option<(u64, String)>,
    method: &str,
    fault: Option<&FaultKind>,
    now: DateTime<Utc>,
) -> Result<Value, Handled> {
    match fault {
        Some(FaultKind::Html(code)) => return Err(Handled::Html(*code)),
        Some(FaultKind::QueryLimit) => {
            return Err(Handled::Api(ApiError::new(
                503,
                "QUERY_LIMIT_EXCEEDED",
                "Too many requests",
            )))
        }
        Some(FaultKind::OperationLimit) => {
            return Err(Handled::Api(ApiError::new(
                429,
                "OPERATION_TIME_LIMIT",
                "Method is blocked due to operation time limit.",
            )))
        }
        _ => {}
    }
    if !st.admit(now) {
        return Err(Handled::Api(ApiError::new(
            503,
            "QUERY_LIMIT_EXCEEDED",
            "Too many requests",
        )));
    }
    let caller = match webhook {
        Some((user_id, code)) => {
            if !st
                .cfg
                .webhooks
                .iter()
                .any(|(u, c)| *u == user_id && *c == code)
            {
                return Err(Handled::Api(ApiError::new(
                    401,
                    "NO_AUTH_FOUND",
                    "Wrong authorization data",
                )));
            }
            Caller::Webhook { user_id, code }
        }
        None => {
            let token = get_ci(params, "auth").map(scalar).unwrap_or_default();
            if token.is_empty() {
                return Err(Handled::Api(ApiError::new(
                    401,
                    "NO_AUTH_FOUND",
                    "Wrong authorization data",
                )));
            }
            if matches!(fault, Some(FaultKind::ExpiredToken)) {
                if let Some(t) = st.access_tokens.get_mut(&token) {
                    t.expires_at = now - Duration::seconds(1);
                }
            }
            match st.access_tokens.get(&token) {
                None => {
                    return Err(Handled::Api(ApiError::new(
                        401,
                        "invalid_token",
                        "Token expired or invalid",
                    )))
                }
                Some(t) if t.expires_at <= now => {
                    return Err(Handled::Api(ApiError::new(
                        401,
                        "expired_token",
                        "The access token provided has expired.",
                    )))
                }
                Some(t) => Caller::App { user_id: t.user_id },
            }
        }
    };
    params.retain(|k, _| !k.eq_ignore_ascii_case("auth"));
    if method == "batch" {
        if st.cfg.batch_billing == BatchBilling::Batch
            && st.operating_blocked(&caller, "batch", now)
        {
            return Err(Handled::Api(ApiError::new(
                429,
                "OPERATION_TIME_LIMIT",
                "Method is blocked due to operation time limit.",
            )));
        }
        let (result, cost) = st.batch(&caller, params, now).map_err(Handled::Api)?;
        let billed = (st.cfg.batch_billing == BatchBilling::Batch)
            .then(|| st.bill_cost(&caller, "batch", cost, now));
        return Ok(json!({"result": result, "time": st.time_obj(now, billed)}));
    }
    let (r, billed) = st.execute(&caller, method, params, now, false);
    let ok = r.map_err(Handled::Api)?;
    let mut body = json!({"result": ok.result});
    if let Some(t) = ok.total {
        body["total"] = json!(t);
    }
    if let Some(n) = ok.next {
        body["next"] = json!(n);
    }
    body["time"] = st.time_obj(now, billed);
    Ok(body)
}

pub(super) async fn oauth_token(
    State(sim): State<Bitrix24Sim>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let now = sim.clock.now();
    let params = request_params(query.as_deref(), &headers, &body);
    let p = |k: &str| params.get(k).map(scalar).unwrap_or_default();
    let mut st = sim.lock();
    if p("client_id") != st.cfg.client_id || p("client_secret") != st.cfg.client_secret {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_client", "error_description": "Invalid client credentials"}))).into_response();
    }
    if p("grant_type") != "refresh_token" {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "invalid_request", "error_description": "Unsupported grant_type"}),
            ),
        )
            .into_response();
    }
    let Some(user_id) = st.refresh_tokens.remove(&p("refresh_token")) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": "Invalid grant"})),
        )
            .into_response();
    };
    let (access, refresh) = st.mint_tokens(user_id, now);
    let ttl = st.cfg.token_ttl.num_seconds();
    let base = st.base_url.clone();
    let host = base
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_string();
    Json(json!({
        "access_token": access,
        "client_endpoint": format!("{base}/rest/"),
        "domain": host,
        "expires": now.timestamp() + ttl,
        "expires_in": ttl,
        "member_id": st.member_id,
        "refresh_token": refresh,
        "scope": "crm,task,telephony,user_basic,im",
        "server_endpoint": format!("{base}/rest/"),
        "status": "L",
        "user_id": user_id,
    }))
    .into_response()
}
