//! Bitrix24 simulator fidelity, per `bitrix24-api.md`. Each test names the section it checks.

use std::collections::HashMap;

use chrono::Duration;
use serde_json::{json, Value};
use ubsync::sim::scenario::CrmKind;
use ubsync::sim::{Bitrix24SimConfig, Fault, FaultKind, Scenario};

use crate::harness::{t0, TestEnv};

fn scenario() -> Scenario {
    Scenario::empty(chrono_tz::Europe::Kyiv)
        .with_operator(10, "101")
        .with_operator(11, "102")
        .with_client(CrmKind::Contact, 797, "+380501112233", 11)
        .with_client(CrmKind::Lead, 798, "+380501112244", 10)
}

async fn env() -> (TestEnv, String) {
    let env = TestEnv::start(scenario()).await;
    let (access, _) = env.sims.bitrix24.install_app(1);
    (env, access)
}

fn register_params(phone: &str, ext: &str) -> Value {
    json!({"USER_ID": 10, "PHONE_NUMBER": phone, "TYPE": 2, "CALL_START_DATE": "2026-11-22T10:00:00+02:00",
           "LINE_NUMBER": "380443334455", "EXTERNAL_CALL_ID": ext, "SHOW": 0, "CRM_CREATE": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_1_webhook_and_oauth_urls_both_work_with_optional_json_suffix_and_any_case() {
    let (env, token) = env().await;
    let (st, body) = env.hook("user.current", json!({})).await;
    assert_eq!((st, body["result"]["ID"].clone()), (200, json!("1")));
    let (st, _) = env.hook("USER.Current.json", json!({})).await;
    assert_eq!(st, 200);
    let (st, body) = env.app(&token, "user.current.json", json!({})).await;
    assert_eq!((st, body["result"]["ID"].clone()), (200, json!("1")));
    // `auth` in the query string works too.
    let r = env
        .http
        .get(format!("{}/rest/user.current?auth={token}", env.b24()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_3_s9_bad_credentials_get_the_documented_errors() {
    let (env, _) = env().await;
    let (st, body) = env.post("/rest/1/wrongcode/user.current", json!({})).await;
    assert_eq!((st, body["error"].as_str()), (401, Some("NO_AUTH_FOUND")));
    let (st, body) = env.post("/rest/user.current", json!({})).await;
    assert_eq!((st, body["error"].as_str()), (401, Some("NO_AUTH_FOUND")));
    let (st, body) = env.app("made-up", "user.current", json!({})).await;
    assert_eq!((st, body["error"].as_str()), (401, Some("invalid_token")));
    let (st, body) = env.hook("no.such.method", json!({})).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (404, Some("ERROR_METHOD_NOT_FOUND"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_3_access_tokens_expire_and_every_refresh_rotates_the_refresh_token() {
    let (env, access) = env().await;
    env.clock.advance(Duration::seconds(3601));
    let (st, body) = env.app(&access, "user.current", json!({})).await;
    assert_eq!((st, body["error"].as_str()), (401, Some("expired_token")));

    let (_, refresh) = env.sims.bitrix24.install_app(1);
    let url = |rt: &str| {
        format!(
            "{}/oauth/token/?grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={rt}",
            env.b24(),
            ubsync::sim::bitrix24::DEFAULT_CLIENT_ID,
            ubsync::sim::bitrix24::DEFAULT_CLIENT_SECRET
        )
    };
    let first: Value = env
        .http
        .get(url(&refresh))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_refresh = first["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(new_refresh, refresh);
    assert_eq!(first["expires_in"], 3600);
    assert!(first["client_endpoint"]
        .as_str()
        .unwrap()
        .ends_with("/rest/"));
    // The old refresh token is now invalid.
    let r = env.http.get(url(&refresh)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["error"], "invalid_grant");
    // The new access token works.
    let (st, _) = env
        .app(
            first["access_token"].as_str().unwrap(),
            "user.current",
            json!({}),
        )
        .await;
    assert_eq!(st, 200);
    // A wrong client secret is invalid_client.
    let bad = env
        .http
        .get(url(&new_refresh).replace("sim-client-secret", "x"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        bad.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_1_the_leaky_bucket_refuses_beyond_its_capacity_and_drains_per_second() {
    let (env, _) = env().await;
    for i in 0..50 {
        let (st, _) = env.hook("user.current", json!({})).await;
        assert_eq!(st, 200, "request {i} within the burst");
    }
    let (st, body) = env.hook("user.current", json!({})).await;
    assert_eq!(st, 503);
    assert_eq!(
        body,
        json!({"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"})
    );
    env.clock.advance(Duration::seconds(1));
    assert_eq!(env.hook("user.current", json!({})).await.0, 200);
    assert_eq!(env.hook("user.current", json!({})).await.0, 200);
    assert_eq!(
        env.hook("user.current", json!({})).await.0,
        503,
        "drain is 2 per second"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_1_a_batch_of_fifty_commands_counts_as_one_request() {
    let (env, _) = env().await;
    let cmd: serde_json::Map<String, Value> = (0..50)
        .map(|i| (format!("c{i}"), json!("user.current")))
        .collect();
    for _ in 0..50 {
        let (st, body) = env.hook("batch", json!({"cmd": cmd})).await;
        assert_eq!(st, 200);
        assert_eq!(body["result"]["result"].as_object().unwrap().len(), 50);
    }
    assert_eq!(env.hook("batch", json!({"cmd": cmd})).await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_2_the_operating_budget_blocks_one_method_with_429_and_reports_in_time() {
    let cfg = Bitrix24SimConfig {
        method_costs: HashMap::from([("crm.lead.list".to_string(), 100.0)]),
        ..Default::default()
    };
    let env = TestEnv::with(scenario(), cfg, ubsync::clock::Clock::manual(t0())).await;
    for _ in 0..5 {
        let (st, body) = env.hook("crm.lead.list", json!({})).await;
        assert_eq!(st, 200);
        assert!(body["time"]["operating"].as_f64().is_some());
        assert_eq!(
            body["time"]["operating_reset_at"],
            json!(t0().timestamp() + 600)
        );
    }
    // 500 s used > 480 s: the next call of this method is refused; others still work.
    let (st, body) = env.hook("crm.lead.list", json!({})).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (429, Some("OPERATION_TIME_LIMIT"))
    );
    assert_eq!(env.hook("user.current", json!({})).await.0, 200);
    env.clock.advance(Duration::minutes(10));
    assert_eq!(
        env.hook("crm.lead.list", json!({})).await.0,
        200,
        "the block lifts when the buckets age out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_batch_resolves_result_references_and_reports_errors_per_command() {
    let (env, token) = env().await;
    let reg = format!(
        "telephony.externalCall.register?{}",
        ubsync::phpquery::build(
            register_params("+380501112233", "unitalk-1")
                .as_object()
                .unwrap()
        )
    );
    let cmd = json!({
        "r_1": reg,
        "f_1": "telephony.externalCall.finish?CALL_ID=%24result%5Br_1%5D%5BCALL_ID%5D&USER_ID=10&DURATION=95&STATUS_CODE=200&ADD_TO_CHAT=0",
        "bad": "telephony.externalCall.finish?CALL_ID=nope&USER_ID=10",
        "after": "user.current",
    });
    let (st, body) = env
        .app(&token, "batch", json!({"halt": 0, "cmd": cmd}))
        .await;
    assert_eq!(st, 200, "a batch answers 200 even when commands fail");
    let r = &body["result"];
    assert!(r["result"]["r_1"]["CALL_ID"]
        .as_str()
        .unwrap()
        .starts_with("externalCall."));
    assert_eq!(r["result"]["f_1"]["CALL_DURATION"], 95);
    assert_eq!(r["result"]["f_1"]["CRM_ENTITY_TYPE"], "CONTACT");
    assert!(r["result_error"]["bad"]["error_description"]
        .as_str()
        .unwrap()
        .contains("Call is not found"));
    assert_eq!(r["result"]["after"]["ID"], "1");
    assert!(r["result_time"]["r_1"]["start"].is_number());

    // halt=1 stops at the first failure.
    let (_, body) = env
        .app(&token, "batch", json!({"halt": 1, "cmd": {"a": "telephony.externalCall.finish?CALL_ID=x&USER_ID=10", "b": "user.current"}}))
        .await;
    assert!(body["result"]["result_error"]["a"].is_object());
    assert_eq!(
        body["result"]["result"],
        json!([]),
        "empty maps are [] and b never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_batch_quirks_numeric_keys_length_limit_and_nested_batches() {
    let (env, _) = env().await;
    let (_, body) = env
        .hook("batch", json!({"cmd": ["user.current", "user.current"]}))
        .await;
    assert!(
        body["result"]["result"].is_array(),
        "numeric command keys turn result into a list"
    );
    assert_eq!(body["result"]["result_error"], json!([]));
    let too_many: serde_json::Map<String, Value> = (0..51)
        .map(|i| (format!("c{i}"), json!("user.current")))
        .collect();
    let (st, body) = env.hook("batch", json!({"cmd": too_many})).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (400, Some("ERROR_BATCH_LENGTH_EXCEEDED"))
    );
    let (_, body) = env
        .hook(
            "batch",
            json!({"cmd": {"inner": "batch?cmd[x]=user.current"}}),
        )
        .await;
    assert_eq!(
        body["result"]["result_error"]["inner"]["error"],
        "ERROR_BATCH_METHOD_NOT_ALLOWED"
    );
    // A form-encoded batch (the double-encoded form of §3) works as well.
    let r = env
        .http
        .post(format!(
            "{}/rest/1/{}/batch",
            env.b24(),
            ubsync::sim::bitrix24::DEFAULT_WEBHOOK_CODE
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("cmd[first]=crm.lead.add%3Ffields%5BTITLE%5D%3DJohn%2526Martin")
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert!(body["result"]["result"]["first"].is_number());
    assert!(env
        .sims
        .bitrix24
        .created_leads()
        .iter()
        .any(|l| l.title == "John&Martin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s0_s4_1_telephony_methods_refuse_webhooks_with_wrong_auth_type() {
    let (env, _) = env().await;
    let (st, body) = env
        .hook(
            "telephony.externalCall.register",
            register_params("+380501112233", "x"),
        )
        .await;
    assert_eq!((st, body["error"].as_str()), (403, Some("WRONG_AUTH_TYPE")));
    let (_, body) = env
        .hook(
            "batch",
            json!({"cmd": {"r": "telephony.externalCall.finish?CALL_ID=x&USER_ID=1"}}),
        )
        .await;
    assert_eq!(
        body["result"]["result_error"]["r"]["error"],
        "WRONG_AUTH_TYPE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_1_register_dedupes_for_30_minutes_until_finished() {
    let (env, token) = env().await;
    let p = register_params("+380509990000", "unitalk-7");
    let (_, a) = env
        .app(&token, "telephony.externalCall.register", p.clone())
        .await;
    let (_, b) = env
        .app(&token, "telephony.externalCall.register", p.clone())
        .await;
    assert_eq!(
        a["result"]["CALL_ID"], b["result"]["CALL_ID"],
        "a repeat within 30 minutes returns the same CALL_ID"
    );
    assert!(
        a["result"]["CRM_CREATED_LEAD"].is_number(),
        "CRM_CREATE=1 makes a lead for an unknown number"
    );
    env.clock.advance(Duration::minutes(31));
    let (_, c) = env
        .app(&token, "telephony.externalCall.register", p.clone())
        .await;
    assert_ne!(a["result"]["CALL_ID"], c["result"]["CALL_ID"]);
    let call_id = c["result"]["CALL_ID"].clone();
    env.app(
        &token,
        "telephony.externalCall.finish",
        json!({"CALL_ID": call_id, "USER_ID": 10, "DURATION": 3}),
    )
    .await;
    let (_, d) = env.app(&token, "telephony.externalCall.register", p).await;
    assert_ne!(
        d["result"]["CALL_ID"], call_id,
        "a finished call is not reused: registering again duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_1_register_validates_like_a_portal() {
    let (env, token) = env().await;
    let cases = [
        (
            json!({"PHONE_NUMBER": "+380501112233", "TYPE": 2}),
            "USER_ID or USER_PHONE_INNER should be set",
        ),
        (
            json!({"USER_ID": 10, "PHONE_NUMBER": "+380501112233", "TYPE": 9}),
            "Unknown TYPE",
        ),
        (
            json!({"USER_ID": 10, "PHONE_NUMBER": "call me", "TYPE": 2}),
            "Unsupported phone number format",
        ),
        (
            json!({"USER_ID": 10, "PHONE_NUMBER": "+380501112233", "TYPE": 2, "CALL_START_DATE": "22.11.2026"}),
            "CALL_START_DATE should be in the ISO-8601 format",
        ),
        (
            json!({"USER_ID": 999, "PHONE_NUMBER": "+380501112233", "TYPE": 2}),
            "User is not found or is not active",
        ),
    ];
    for (params, text) in cases {
        let (st, body) = env
            .app(&token, "telephony.externalCall.register", params)
            .await;
        assert_eq!((st, body["error"].as_str()), (400, Some("ERROR_CORE")));
        assert_eq!(body["error_description"], text);
    }
    let (st, body) = env
        .app(
            &token,
            "telephony.externalCall.register",
            json!({"USER_PHONE_INNER": "102", "PHONE_NUMBER": "+380501112233", "TYPE": 1}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_2_finish_creates_the_activity_and_is_not_idempotent() {
    let (env, token) = env().await;
    let (_, reg) = env
        .app(
            &token,
            "telephony.externalCall.register",
            register_params("+380501112244", "unitalk-9"),
        )
        .await;
    let call_id = reg["result"]["CALL_ID"].clone();
    assert_eq!(reg["result"]["CRM_ENTITY_TYPE"], "LEAD");
    let (st, fin) = env.app(&token, "telephony.externalCall.finish", json!({"CALL_ID": call_id, "USER_ID": 10, "DURATION": 0, "STATUS_CODE": "304", "ADD_TO_CHAT": 0})).await;
    assert_eq!(st, 200);
    assert_eq!(fin["result"]["CALL_STATUS"], 0, "304 is a missed call");
    assert_eq!(fin["result"]["CALL_START_DATE"], json!({}));
    assert!(fin["result"]["CRM_ACTIVITY_ID"].is_number());
    assert_eq!(env.sims.bitrix24.activities().len(), 1);
    let (st, again) = env
        .app(
            &token,
            "telephony.externalCall.finish",
            json!({"CALL_ID": call_id, "USER_ID": 10}),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(
        again["error_description"],
        "Call is not found (call should be registered prior to finishing"
    );
    let (st, bad) = env
        .app(
            &token,
            "telephony.externalCall.finish",
            json!({"CALL_ID": 5, "USER_ID": 10}),
        )
        .await;
    assert_eq!((st, bad["error"].as_str()), (400, Some("INVALID_ARGUMENT")));
    assert_eq!(env.sims.bitrix24.stats().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_3_attach_record_only_after_finish_and_it_replaces() {
    let (env, token) = env().await;
    let (_, reg) = env
        .app(
            &token,
            "telephony.externalCall.register",
            register_params("+380501112233", "unitalk-3"),
        )
        .await;
    let call_id = reg["result"]["CALL_ID"].clone();
    let (st, early) = env
        .app(
            &token,
            "telephony.externalCall.attachRecord",
            json!({"CALL_ID": call_id, "RECORD_URL": "https://r/1.mp3"}),
        )
        .await;
    assert_eq!(st, 400);
    assert!(early["error_description"]
        .as_str()
        .unwrap()
        .contains("not finished yet"));
    env.app(
        &token,
        "telephony.externalCall.finish",
        json!({"CALL_ID": call_id, "USER_ID": 10, "DURATION": 5}),
    )
    .await;
    let (st, ok) = env
        .app(
            &token,
            "telephony.externalCall.attachRecord",
            json!({"CALL_ID": call_id, "RECORD_URL": "https://r/1.mp3"}),
        )
        .await;
    assert_eq!(st, 200);
    assert!(ok["result"]["FILE_ID"].is_number());
    env.app(
        &token,
        "telephony.externalCall.attachRecord",
        json!({"CALL_ID": call_id, "RECORD_URL": "https://r/2.mp3"}),
    )
    .await;
    let row = &env.sims.bitrix24.stats()[0];
    assert_eq!(row.record_url.as_deref(), Some("https://r/2.mp3"));
    let (_, bad) = env
        .app(
            &token,
            "telephony.externalCall.attachRecord",
            json!({"CALL_ID": call_id, "FILENAME": "x.ogg", "FILE_CONTENT": "AA=="}),
        )
        .await;
    assert_eq!(
        bad["error_description"],
        "Wrong file extension. Only wav and mp3 are allowed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_4_s4_8_crm_search_and_statistics_by_external_call_id() {
    // 110 requests under a frozen clock: an Enterprise-sized bucket keeps them all in.
    let cfg = Bitrix24SimConfig {
        burst: 250.0,
        ..Default::default()
    };
    let env = TestEnv::with(scenario(), cfg, ubsync::clock::Clock::manual(t0())).await;
    let (token, _) = env.sims.bitrix24.install_app(1);
    let (_, found) = env
        .hook(
            "telephony.externalCall.searchCrmEntities",
            json!({"PHONE_NUMBER": "380501112233"}),
        )
        .await;
    assert_eq!(found["result"][0]["CRM_ENTITY_TYPE"], "CONTACT");
    assert_eq!(found["result"][0]["ASSIGNED_BY_ID"], 11);
    for i in 0..55 {
        let (_, reg) = env
            .app(
                &token,
                "telephony.externalCall.register",
                register_params("+380501112233", &format!("unitalk-{i}")),
            )
            .await;
        env.app(
            &token,
            "telephony.externalCall.finish",
            json!({"CALL_ID": reg["result"]["CALL_ID"], "USER_ID": 10, "DURATION": 1}),
        )
        .await;
    }
    let (_, one) = env
        .app(
            &token,
            "voximplant.statistic.get",
            json!({"FILTER": {"EXTERNAL_CALL_ID": "unitalk-42"}}),
        )
        .await;
    assert_eq!(one["total"], 1);
    assert_eq!(one["result"][0]["EXTERNAL_CALL_ID"], "unitalk-42");
    assert_eq!(
        one["result"][0]["CALL_START_DATE"],
        "2026-11-22T10:00:00+02:00"
    );
    let (_, page) = env
        .app(&token, "voximplant.statistic.get", json!({"FILTER": {">=CALL_START_DATE": "2026-11-22T07:00:00+00:00", "<=CALL_START_DATE": "2026-11-22T09:00:00Z"}}))
        .await;
    assert_eq!(page["total"], 55);
    assert_eq!(page["result"].as_array().unwrap().len(), 50, "50 per page");
    assert_eq!(page["next"], 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_3_findbycomm_answers_a_map_or_an_empty_list() {
    let (env, _) = env().await;
    let (_, hit) = env
        .hook(
            "crm.duplicate.findbycomm",
            json!({"type": "PHONE", "values": ["+380501112233", "380501112244"]}),
        )
        .await;
    assert_eq!(hit["result"], json!({"LEAD": [798], "CONTACT": [797]}));
    let (_, miss) = env
        .hook(
            "crm.duplicate.findbycomm",
            json!({"type": "PHONE", "values": ["0501112233"]}),
        )
        .await;
    assert_eq!(
        miss["result"],
        json!([]),
        "other formats do not match; nothing found is []"
    );
    let many: Vec<String> = (0..21).map(|i| format!("+3805000000{i:02}")).collect();
    let (st, _) = env
        .hook(
            "crm.duplicate.findbycomm",
            json!({"type": "PHONE", "values": many}),
        )
        .await;
    assert_eq!(st, 400);
    let (st, body) = env
        .hook("crm.duplicate.findbycomm", json!({"values": ["1"]}))
        .await;
    assert_eq!(
        (st, body["error"].as_str()),
        (400, Some("Communication type is not defined"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_1_s5_2_activity_add_has_empty_error_codes_and_list_filters_by_origin_id() {
    let (env, _) = env().await;
    let (st, body) = env
        .hook(
            "crm.activity.add",
            json!({"fields": {"TYPE_ID": 2, "SUBJECT": "x"}}),
        )
        .await;
    assert_eq!((st, body["error"].as_str()), (400, Some("")));
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("COMMUNICATIONS"));
    let fields = json!({"OWNER_TYPE_ID": 3, "OWNER_ID": 797, "TYPE_ID": 2, "SUBJECT": "Incoming call", "DIRECTION": 1,
        "COMMUNICATIONS": [{"VALUE": "+380501112233", "ENTITY_ID": 797, "ENTITY_TYPE_ID": 3}],
        "START_TIME": "2026-11-22T10:00:00+02:00", "END_TIME": "2026-11-22T10:01:00+02:00", "COMPLETED": "Y",
        "RESPONSIBLE_ID": 11, "ORIGINATOR_ID": "ubsync", "ORIGIN_ID": "unitalk-5"});
    let (st, id) = env
        .hook("crm.activity.add", json!({"fields": fields}))
        .await;
    assert_eq!(st, 200);
    let (_, list) = env.hook("crm.activity.list", json!({"filter": {"ORIGINATOR_ID": "ubsync", "ORIGIN_ID": "unitalk-5"}, "select": ["ID"]})).await;
    assert_eq!(
        list["result"],
        json!([{"ID": id["result"].as_u64().unwrap().to_string()}])
    );
    let mut no_subject = fields.clone();
    no_subject["SUBJECT"] = json!("");
    let (_, body) = env
        .hook("crm.activity.add", json!({"fields": no_subject}))
        .await;
    assert_eq!(
        body["error_description"],
        "The field SUBJECT is not defined or empty."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_tasks_answer_in_camel_case() {
    let (env, _) = env().await;
    let (st, t) = env
        .hook("tasks.task.add", json!({"fields": {"TITLE": "Missed call", "RESPONSIBLE_ID": 11, "DEADLINE": "2026-11-22T10:30:00+02:00", "UF_CRM_TASK": ["C_797"]}}))
        .await;
    assert_eq!(st, 200);
    let task = &t["result"]["task"];
    assert_eq!(task["responsibleId"], "11");
    assert_eq!(task["status"], "2");
    assert!(
        task.get("ufCrmTask").is_none(),
        "bindings only when selected"
    );
    let id = task["id"].as_str().unwrap();
    let (_, list) = env
        .hook(
            "tasks.task.list",
            json!({"filter": {"UF_CRM_TASK": "C_797"}}),
        )
        .await;
    assert_eq!(list["result"]["tasks"][0]["id"], id);
    let (_, done) = env.hook("tasks.task.complete", json!({"taskId": id})).await;
    assert_eq!(done["result"]["task"]["status"], "5");
    let (st, _) = env
        .hook("tasks.task.add", json!({"fields": {"TITLE": "x"}}))
        .await;
    assert_eq!(st, 400, "RESPONSIBLE_ID is required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_user_get_filters_by_inner_extension() {
    let (env, _) = env().await;
    let (_, body) = env
        .hook(
            "user.get",
            json!({"filter": {"UF_PHONE_INNER": "102", "ACTIVE": true}}),
        )
        .await;
    assert_eq!(body["result"][0]["ID"], "11");
    assert_eq!(body["total"], 1);
    let (_, top) = env.hook("user.get", json!({"UF_PHONE_INNER": "101"})).await;
    assert_eq!(
        top["result"][0]["ID"], "10",
        "filter keys at the top level work too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_4_faults_html_5xx_forced_expiry_and_commit_then_drop() {
    let (env, token) = env().await;
    env.sims
        .bitrix24
        .inject(Fault::once(Some("user.current"), FaultKind::Html(502)));
    let (st, body) = env.hook("user.current", json!({})).await;
    assert_eq!(st, 502);
    assert!(body.as_str().unwrap().contains("<html>"));

    env.sims
        .bitrix24
        .inject(Fault::once(None, FaultKind::ExpiredToken));
    let (st, body) = env.app(&token, "user.current", json!({})).await;
    assert_eq!((st, body["error"].as_str()), (401, Some("expired_token")));

    env.sims
        .bitrix24
        .inject(Fault::once(Some("crm.lead.add"), FaultKind::CommitThenDrop));
    let r = env
        .http
        .post(format!(
            "{}/rest/1/{}/crm.lead.add",
            env.b24(),
            ubsync::sim::bitrix24::DEFAULT_WEBHOOK_CODE
        ))
        .json(&json!({"fields": {"TITLE": "dropped"}}))
        .send()
        .await;
    assert!(r.is_err(), "the connection is dropped without an answer");
    assert_eq!(
        env.sims.bitrix24.created_leads().len(),
        1,
        "but the write was committed"
    );
}
