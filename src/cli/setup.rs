//! Setting up and checking: `check` (a verdict per part) and `auth set-refresh-token`.

use super::*;

pub(super) async fn check(path: &std::path::Path, offline: bool) -> anyhow::Result<u8> {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(e) => {
            verdict("config", "FAIL", &e.to_string());
            return Ok(EXIT_CONFIG);
        }
    };
    verdict(
        "config",
        "ok",
        &format!(
            "{} (mode {}, portal {})",
            cfg.source.display(),
            cfg.bitrix24.mode,
            cfg.bitrix24.portal_display()
        ),
    );
    match daemon_schedule(&cfg) {
        Ok((schedule, from)) => verdict(
            "schedule",
            "ok",
            &format!("{from}: {} jobs for `ubsync run`", schedule.jobs.len()),
        ),
        Err(e) => {
            verdict("schedule", "FAIL", &e.to_string());
            return Ok(EXIT_CONFIG);
        }
    }
    let store = match Store::open(&cfg.state.path) {
        Ok(s) => s,
        Err(e) => {
            verdict("store", "FAIL", &e.to_string());
            return Ok(if matches!(e, StoreError::Busy(_)) {
                EXIT_TEMPFAIL
            } else {
                1
            });
        }
    };
    verdict(
        "store",
        "ok",
        &format!(
            "{} (schema v{})",
            cfg.state.path.display(),
            store.schema_version()?
        ),
    );
    let loose = crate::store::files::too_open(&cfg.state.path);
    for (file, mode) in &loose {
        verdict(
            "files",
            "WARN",
            &format!(
                "{} is readable by others (mode {mode:o}); it holds tokens: chmod {} it",
                file.display(),
                if file.is_dir() { "700" } else { "600" }
            ),
        );
    }
    {
        let b24 = Bitrix24Client::new(
            &cfg.bitrix24,
            SharedStore::new(Store::open(&cfg.state.path)?),
            Clock::system(),
        )?;
        if let Some(to) = b24.remembered_move() {
            verdict(
                "portal",
                "WARN",
                &format!(
                    "configured {} but the portal answered a redirect to {to}, which requests now use; update the config and run `ubsync auth forget-redirect`",
                    b24.configured_origin()
                ),
            );
        }
    }
    if offline {
        verdict("unitalk", "skipped", "--offline");
        verdict("bitrix24", "skipped", "--offline");
        return Ok(0);
    }
    let store = SharedStore::new(store);
    let mut worst = 0u8;
    let mut note = |code: u8| {
        // 2 (an admin must act) outranks 75 (retry later), which outranks 1.
        let rank = |c: u8| match c {
            0 => 0,
            1 => 1,
            EXIT_TEMPFAIL => 2,
            _ => 3,
        };
        if rank(code) > rank(worst) {
            worst = code;
        }
    };

    let unitalk = UnitalkClient::new(&cfg.unitalk)?;
    let lines = unitalk.inner_lines().await;
    match unitalk.users().await {
        Ok(users) => verdict(
            "unitalk",
            "ok",
            &format!(
                "{}: key accepted, {} operators with inner lines",
                cfg.unitalk.base_url,
                users.len()
            ),
        ),
        Err(e) => {
            verdict("unitalk", "FAIL", &e.to_string());
            note(unitalk_code(&e));
        }
    }

    // `/phones/inner` is unconfirmed and optional: its state is reported, never a failure.
    match lines {
        Ok(l) => verdict(
            "lines",
            "ok",
            &format!("inner-line statuses: {} lines", l.len()),
        ),
        Err(e) => verdict(
            "lines",
            "WARN",
            &format!("inner-line statuses: unavailable: {e} (call sync is not affected)"),
        ),
    }

    // A check gives a verdict now: a full bucket is reported, not waited out.
    let b24 = Bitrix24Client::new(&cfg.bitrix24, store.clone(), Clock::system())?
        .with_rate_limit_patience(std::time::Duration::ZERO);
    // The address first: a mistyped portal is a wrong address, not missing tokens.
    if let Err(why) = b24.reach(std::time::Duration::from_secs(10)).await {
        let key = match cfg.bitrix24.mode {
            Mode::Telephony => "bitrix24.portal_url",
            Mode::Activity => "bitrix24.webhook_url",
        };
        verdict(
            "bitrix24",
            "FAIL",
            &format!("cannot reach the portal: {why}; check {key} in the config"),
        );
        note(2);
        return Ok(worst);
    }
    if cfg.bitrix24.mode == Mode::Telephony {
        // Tokens stored under another address: the address in the config is the suspect.
        let here = cfg
            .bitrix24
            .portal_url
            .as_ref()
            .map(crate::bitrix24::portal_key)
            .unwrap_or_default();
        let stored = store.lock().token_portals().unwrap_or_default();
        if !stored.is_empty() && !stored.contains(&here) {
            verdict(
                "bitrix24",
                "FAIL",
                &format!(
                    "no OAuth tokens are stored for {here}, but they are for {}: is bitrix24.portal_url right? (a different portal needs its own install)",
                    stored.join(", ")
                ),
            );
            note(2);
            return Ok(worst);
        }
    }
    match b24.call("user.current", serde_json::Value::Null).await {
        Ok(env) => {
            let r = &env.result;
            let name = format!(
                "{} {}",
                r.get("NAME").and_then(|v| v.as_str()).unwrap_or(""),
                r.get("LAST_NAME").and_then(|v| v.as_str()).unwrap_or("")
            );
            let id = r
                .get("ID")
                .and_then(crate::bitrix24::wire::as_text)
                .unwrap_or_default();
            let how = match cfg.bitrix24.mode {
                Mode::Telephony => "OAuth application",
                Mode::Activity => "incoming webhook",
            };
            verdict(
                "bitrix24",
                "ok",
                &format!(
                    "{}: {how} authenticated as user {id} ({})",
                    cfg.bitrix24.portal_display(),
                    name.trim()
                ),
            );
        }
        Err(e) => {
            verdict("bitrix24", "FAIL", &e.to_string());
            note(bitrix24_code(&e));
            return Ok(worst);
        }
    }
    if cfg.bitrix24.mode == Mode::Telephony {
        // A stored access token works for up to an hour whatever the client credentials; a
        // refresh proves them (its new pair is stored, as at any refresh).
        match b24.prove_client_credentials().await {
            Ok(()) => verdict(
                "oauth",
                "ok",
                "client_id and client_secret proven: the token pair was refreshed and stored",
            ),
            Err(e @ Bitrix24Error::Auth { .. }) => {
                verdict(
                    "oauth",
                    "FAIL",
                    &format!(
                        "the OAuth server refused a refresh ({e}): the stored access token stops working within an hour; check bitrix24.client_id and client_secret against the application in the portal"
                    ),
                );
                note(2);
            }
            Err(e) => {
                verdict(
                    "oauth",
                    "WARN",
                    &format!("could not prove the client credentials now: {e}"),
                );
                note(bitrix24_code(&e));
            }
        }
    }
    if let Some((status, text)) = check_events(&cfg, &b24).await {
        verdict("events", status, &text);
    }
    if cfg.webhooks.unitalk_secret.is_some() {
        verdict(
            "webhooks",
            "ok",
            "Unitalk call webhooks accepted at POST /unitalk/webhook/<secret> on `ubsync run --listen`",
        );
    }
    if let Some((status, text)) = check_field_mapping(&cfg, &b24).await {
        verdict("fields", status, &text);
        if status == "FAIL" {
            note(2);
        }
    }
    Ok(worst)
}

/// Which route Bitrix24's telephony events take, why, and whether they are bound.
async fn check_events(cfg: &Config, b24: &Bitrix24Client) -> Option<(&'static str, String)> {
    let w = &cfg.webhooks;
    if !w.bitrix24_events {
        return None;
    }
    let bound: Vec<String> = match crate::sync::bound_events(b24).await {
        Ok(b) => b.into_iter().map(|(e, _)| e).collect(),
        Err(e) => {
            return Some((
                "WARN",
                format!("cannot list the bound events (event.get): {e}"),
            ))
        }
    };
    let missing: Vec<&str> = crate::sync::clicks_events()
        .iter()
        .copied()
        .filter(|e| !bound.iter().any(|b| b == e))
        .collect();
    let route = if w.bitrix24_offline {
        "offline: ubsync polls event.offline.get every 5 s (no inbound address; needs an administrator's tokens)".to_string()
    } else {
        format!(
            "online: Bitrix24 posts to {} (set by webhooks.bitrix24_handler)",
            w.bitrix24_handler
                .as_ref()
                .map(|u| u.as_str())
                .unwrap_or("?")
        )
    };
    Some(if missing.is_empty() {
        (
            "ok",
            format!("{route}; click-to-call, callback and uninstall events bound"),
        )
    } else {
        (
            "WARN",
            format!(
                "{route}; not bound yet: {} (the daemon binds them when it starts)",
                missing.join(", ")
            ),
        )
    })
}

/// `[rules.fields]` checked against the portal's field lists: every mapped field must exist.
/// `None` when nothing is mapped.
async fn check_field_mapping(cfg: &Config, b24: &Bitrix24Client) -> Option<(&'static str, String)> {
    let f = &cfg.rules.fields;
    let kinds: [(&str, &str, &crate::rules::FieldMap); 3] = [
        ("task", "tasks.task.getFields", &f.task),
        ("activity", "crm.activity.fields", &f.activity),
        ("lead", "crm.lead.fields", &f.lead),
    ];
    if kinds.iter().all(|(_, _, l)| l.is_empty()) {
        return None;
    }
    let mut missing = Vec::new();
    let mut checked = 0;
    for (kind, method, list) in kinds {
        if list.is_empty() {
            continue;
        }
        let env = match b24.call(method, serde_json::json!({})).await {
            Ok(env) => env,
            Err(e) => {
                return Some((
                    "WARN",
                    format!("could not read the portal's {kind} fields ({method}): {e}"),
                ))
            }
        };
        let known = env.result.get("fields").unwrap_or(&env.result);
        for (name, _) in list {
            checked += 1;
            if known.get(name).is_none() {
                missing.push(format!("rules.fields.{kind}.{name}"));
            }
        }
    }
    Some(if missing.is_empty() {
        ("ok", format!("{checked} mapped fields exist in the portal"))
    } else {
        (
            "FAIL",
            format!(
                "the portal has no field {}; create the user field in Bitrix24 or fix the name",
                missing.join(", ")
            ),
        )
    })
}

/// Fact: the SHA-256 of the last refresh token `auth set-refresh-token` exchanged.
const FACT_EXCHANGED_TOKEN: &str = "bitrix24.exchanged_refresh_token_sha256";

pub(super) async fn set_refresh_token(path: &std::path::Path, token: &str) -> anyhow::Result<u8> {
    let cfg = load_config(path)?;
    telephony_only(&cfg)?;
    let store = SharedStore::new(Store::open(&cfg.state.path)?);
    let client = Bitrix24Client::new(&cfg.bitrix24, store.clone(), Clock::system())?;
    // Only a digest of a token this install exchanged is kept, to know it again.
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(token.trim().as_bytes()))
    };
    let tokens = match client.exchange(token.trim()).await {
        Ok(t) => t,
        Err(Bitrix24Error::Auth { code, .. }) if code == "invalid_grant" => {
            let works = client.call("app.info", serde_json::json!({})).await.is_ok();
            let ours = store.lock().fact(FACT_EXCHANGED_TOKEN)?.as_deref() == Some(&digest);
            let portal = cfg.bitrix24.portal_display();
            if ours && works {
                // The same bootstrap command run twice: nothing to do.
                crate::say!(
                    "this refresh token was already exchanged by this install; the stored OAuth tokens for {portal} work, nothing to change"
                );
                return Ok(0);
            }
            let stored = if works {
                format!("the stored OAuth tokens for {portal} still work and were kept")
            } else {
                format!("there are no working OAuth tokens for {portal}: install the local application again (`ubsync auth serve`) or give a fresh refresh token")
            };
            crate::redact::complain(&format!(
                "ubsync: error: the OAuth server refused this refresh token (invalid_grant: mistyped, revoked, or already used elsewhere); nothing changed; {stored}"
            ));
            return Ok(2);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cannot exchange the refresh token")),
    };
    store
        .lock()
        .set_fact(FACT_EXCHANGED_TOKEN, &digest, Clock::system().now())?;
    crate::say!(
        "stored a new OAuth token pair for {} (access token valid until {})",
        cfg.bitrix24.portal_display(),
        tokens
            .expires_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "unknown".into())
    );
    Ok(0)
}
