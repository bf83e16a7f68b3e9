//! `recordings.delivery = "upload"`: ubsync downloads each recording and attaches the file; a
//! download that fails (an error page, a 404, an HTML body) is retried by a later pass, never lost
//! and never a second registration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{Duration, NaiveDateTime};
use ubsync::clock::Clock;
use ubsync::sim::scenario::Scenario;
use ubsync::sim::Bitrix24SimConfig;

use crate::harness::{pass, t0, TestEnv};

type Files = Arc<Mutex<HashMap<String, (u16, Vec<u8>, Option<String>)>>>;

/// A recording server: `/rec/NAME` answers what `files` holds (status, body, required
/// Authorization), 404 for anything else.
async fn recording_server(files: Files) -> ubsync::sim::Served {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    let router = axum::Router::new()
        .route(
            "/rec/{name}",
            axum::routing::get(
                |State(files): State<Files>, Path(name): Path<String>, headers: HeaderMap| async move {
                    let files = files.lock().unwrap();
                    match files.get(&name) {
                        Some((_, _, Some(key)))
                            if headers.get("authorization").and_then(|v| v.to_str().ok())
                                != Some(key.as_str()) =>
                        {
                            (StatusCode::UNAUTHORIZED, b"no".to_vec())
                        }
                        Some((status, body, _)) => {
                            (StatusCode::from_u16(*status).unwrap(), body.clone())
                        }
                        None => (StatusCode::NOT_FOUND, b"<html>404</html>".to_vec()),
                    }
                },
            ),
        )
        .with_state(files);
    ubsync::sim::serve("127.0.0.1:0".parse().unwrap(), router)
        .await
        .unwrap()
}

fn n(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

const MP3: &[u8] = b"ID3\x04\x00\x00\x00\x00\x00\x00fake mp3 frames";
const WAV: &[u8] = b"RIFF\x24\x00\x00\x00WAVEfmt fake wav";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_recordings_arrive_as_files_and_failed_downloads_are_retried_not_lost() {
    let files: Files = Default::default();
    let server = recording_server(files.clone()).await;
    let base = server.base_url();
    {
        let mut f = files.lock().unwrap();
        f.insert("a.mp3".into(), (200, MP3.to_vec(), None));
        f.insert("b.wav".into(), (200, WAV.to_vec(), None));
        f.insert("c.mp3".into(), (503, b"busy".to_vec(), None));
        f.insert("d.mp3".into(), (200, b"<html>login</html>".to_vec(), None));
    }
    let mut s = Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    let mut ids = Vec::new();
    for (i, name) in ["a.mp3", "b.wav", "c.mp3", "d.mp3"].iter().enumerate() {
        ids.push(s.add_call(
            n(&format!("2026-11-21 10:0{i}:00")),
            "IN",
            "380501112233",
            &["101"],
            "ANSWER",
            30,
            Some(&format!("{base}/rec/{name}")),
        ));
    }
    let roomy = Bitrix24SimConfig {
        burst: 1000.0,
        ..Default::default()
    };
    let env = TestEnv::with(s, roomy, Clock::manual(t0())).await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[recordings]\ndelivery = \"upload\"\n",
    );
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert_eq!(first.pushed, 4, "{first:?}");
    assert_eq!(first.recordings, 2, "{first:?}");
    assert_eq!(first.recording_downloads_failed, 2, "{first:?}");
    let stats = env.sims.bitrix24.stats();
    let by_ext = |id: u64| {
        stats
            .iter()
            .find(|r| r.external_call_id.as_deref() == Some(&format!("unitalk-{id}")))
            .unwrap()
            .clone()
    };
    assert_eq!(by_ext(ids[0]).record_content.as_deref(), Some(MP3));
    assert_eq!(by_ext(ids[1]).record_content.as_deref(), Some(WAV));
    assert!(by_ext(ids[2]).record_file_id.is_none());
    assert!(
        by_ext(ids[3]).record_file_id.is_none(),
        "an HTML page is no recording"
    );
    let row = ctx
        .store
        .lock()
        .ledger_row(&ids[3].to_string())
        .unwrap()
        .unwrap();
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("not mp3 or wav"),
        "{row:?}"
    );

    // The links work now: a later pass attaches both, and registers nothing again.
    {
        let mut f = files.lock().unwrap();
        f.insert("c.mp3".into(), (200, MP3.to_vec(), None));
        f.insert("d.mp3".into(), (200, MP3.to_vec(), None));
    }
    env.clock.advance(Duration::hours(1));
    let second = pass(&ctx).await.unwrap();
    assert_eq!(second.recordings, 2, "{second:?}");
    let stats = env.sims.bitrix24.stats();
    assert_eq!(stats.len(), 4, "never a second registration");
    assert!(stats
        .iter()
        .all(|r| r.record_content.is_some() && r.record_attachments == 1));
    assert!(
        stats.iter().all(|r| r
            .record_url
            .as_deref()
            .unwrap_or("")
            .starts_with("content:")),
        "Bitrix24 was never asked to download a link itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_that_need_the_api_key_get_it_only_when_configured() {
    let files: Files = Default::default();
    let server = recording_server(files.clone()).await;
    let key = ubsync::sim::unitalk::DEFAULT_API_KEY.to_string();
    files
        .lock()
        .unwrap()
        .insert("k.mp3".into(), (200, MP3.to_vec(), Some(key)));
    let mut s = Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    let id = s.add_call(
        n("2026-11-21 10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        30,
        Some(&format!("{}/rec/k.mp3", server.base_url())),
    );
    let env = TestEnv::with(
        s,
        Bitrix24SimConfig {
            burst: 1000.0,
            ..Default::default()
        },
        Clock::manual(t0()),
    )
    .await;
    env.write_config(
        "telephony",
        "[sync]\nstart = \"2026-11-21\"\n[recordings]\ndelivery = \"upload\"\n",
    );
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    let row = ctx
        .store
        .lock()
        .ledger_row(&id.to_string())
        .unwrap()
        .unwrap();
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("recordings.send_api_key"),
        "{row:?}"
    );
    drop(ctx);
    env.edit_config(|t| {
        t.replace(
            "delivery = \"upload\"\n",
            "delivery = \"upload\"\nsend_api_key = true\n",
        )
    });
    let ctx = env.ctx().await;
    env.clock.advance(Duration::hours(1));
    let p = pass(&ctx).await.unwrap();
    assert_eq!(p.recordings, 1, "{p:?}");
}
