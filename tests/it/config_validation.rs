//! Configuration errors each name their key and say how to fix it.

use std::path::Path;

use ubsync::config::{Config, ConfigError, Env};

const BASE: &str = r#"
[unitalk]
api_key = "k"
[bitrix24]
mode = "telephony"
portal_url = "https://p.bitrix24.ua"
client_id = "local.1"
client_secret = "s"
"#;

fn problems(text: &str) -> (Vec<String>, String) {
    match Config::parse(text, Path::new("/tmp/ubsync.toml"), &Env::default()) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => {
            let msg = e.to_string();
            let keys = match &e {
                ConfigError::Invalid { .. } => e.keys(),
                ConfigError::Syntax { message, .. } => vec![message.clone()],
                ConfigError::Read { .. } => vec![],
            };
            (keys, msg)
        }
    }
}

#[test]
fn the_base_config_is_valid() {
    Config::parse(BASE, Path::new("/tmp/ubsync.toml"), &Env::default()).unwrap();
}

#[test]
fn every_invalid_value_is_reported_with_its_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[unitalk]\ntimezone = \"Mars/Olympus\"",
            "unitalk.timezone",
            "IANA",
        ),
        (
            "[unitalk]\nbase_url = \"not a url\"",
            "unitalk.base_url",
            "URL",
        ),
        (
            "[unitalk]\nbase_url = \"ftp://x\"",
            "unitalk.base_url",
            "http",
        ),
        (
            "[unitalk]\npage_size = 1001",
            "unitalk.page_size",
            "1 to 1000",
        ),
        ("[bitrix24]\nmode = \"fax\"", "bitrix24.mode", "telephony"),
        ("[bitrix24]\nburst = 0", "bitrix24.burst", "whole number"),
        (
            "[bitrix24]\nper_second = -2",
            "bitrix24.per_second",
            "whole number",
        ),
        (
            "[bitrix24]\noauth_url = \"::\"",
            "bitrix24.oauth_url",
            "URL",
        ),
        (
            "[bitrix24]\nwebhook_url = \"https://p.bitrix24.ua/rest/xx\"",
            "bitrix24.webhook_url",
            "/rest/<user_id>/<code>/",
        ),
        (
            "[bitrix24]\ndefault_user_id = 0",
            "bitrix24.default_user_id",
            "user",
        ),
        (
            "[bitrix24]\nrequest_timeout = \"soon\"",
            "bitrix24.request_timeout",
            "duration",
        ),
        ("[sync]\nstart = \"last tuesday\"", "sync.start", "date"),
        (
            "[sync]\nlookback = \"ten minutes\"",
            "sync.lookback",
            "duration",
        ),
        ("[sync]\nmax_window = \"5s\"", "sync.max_window", "minute"),
        (
            "[sync]\ndefault_country = \"Ukraine\"",
            "sync.default_country",
            "ISO 3166",
        ),
        (
            "[tasks]\ndeadline_minutes = 0",
            "tasks.deadline_minutes",
            "minutes",
        ),
        ("[tasks]\ntitle = \"  \"", "tasks.title", "template"),
        // Security: no plain http beyond loopback, no credentials in URLs, no absurd durations.
        (
            "[unitalk]\nbase_url = \"http://api.unitalk.example/api\"",
            "unitalk.base_url",
            "unitalk.allow_insecure_http",
        ),
        (
            "[bitrix24]\noauth_url = \"http://oauth.example\"",
            "bitrix24.oauth_url",
            "bitrix24.allow_insecure_http",
        ),
        (
            "[bitrix24]\nwebhook_url = \"https://u:pw@p.bitrix24.ua/rest/1/abcdef123/\"",
            "bitrix24.webhook_url",
            "password",
        ),
        (
            "[bitrix24]\nwebhook_url = \"file:///rest/1/abcdef123/\"",
            "bitrix24.webhook_url",
            "https://",
        ),
        (
            "[bitrix24]\nrequest_timeout = \"0s\"",
            "bitrix24.request_timeout",
            "from 100ms to 10m",
        ),
        (
            "[unitalk]\nretry_base_delay = \"0s\"",
            "unitalk.retry_base_delay",
            "from 1ms",
        ),
        (
            "[sync]\nlookback = \"400days\"",
            "sync.lookback",
            "out of range",
        ),
    ];
    for (snippet, key, hint) in cases {
        // Merge the snippet's section into BASE by appending a second table of the same name is
        // not valid TOML, so rebuild: BASE sections first, the snippet's keys placed under them.
        let text = merge(BASE, snippet);
        let (keys, msg) = problems(&text);
        assert!(
            keys.iter().any(|k| k == key),
            "{snippet}: expected key {key}, got {keys:?}\n{msg}"
        );
        assert!(
            msg.contains(hint),
            "{snippet}: message lacks {hint:?}: {msg}"
        );
    }
}

#[test]
fn telephony_mode_without_oauth_credentials_names_each_missing_key() {
    let (keys, msg) = problems("[unitalk]\napi_key = \"k\"\n[bitrix24]\nmode = \"telephony\"\n");
    for k in [
        "bitrix24.portal_url",
        "bitrix24.client_id",
        "bitrix24.client_secret",
    ] {
        assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
    }
    assert!(msg.contains("local application"), "{msg}");
}

#[test]
fn activity_mode_without_a_webhook_names_the_key() {
    let (keys, msg) = problems("[unitalk]\napi_key = \"k\"\n[bitrix24]\nmode = \"activity\"\n");
    assert_eq!(keys, vec!["bitrix24.webhook_url"]);
    assert!(msg.contains("UBSYNC_BITRIX24_WEBHOOK_URL"), "{msg}");
}

#[test]
fn a_missing_api_key_points_to_the_environment_variable() {
    let (keys, msg) = problems(&BASE.replace("api_key = \"k\"", ""));
    assert_eq!(keys, vec!["unitalk.api_key"]);
    assert!(msg.contains("UBSYNC_UNITALK_API_KEY"));
}

#[test]
fn unknown_keys_are_errors_that_name_the_full_key() {
    let (keys, msg) = problems(&format!("{BASE}\n[sync]\nlookbak = \"5m\"\n"));
    assert_eq!(keys, ["sync.lookbak"], "{msg}");
    assert!(msg.contains("`sync.lookbak`: unknown key"), "{msg}");
    let (keys, _) = problems(&format!("{BASE}\n[bogus]\nx = 1\n"));
    assert!(keys[0].contains("bogus"), "{keys:?}");
}

#[test]
fn every_problem_is_reported_in_one_run_unknown_keys_included() {
    let text = format!(
        "{}\n[sync]\nlookbak = \"5m\"\nsettle = \"soon\"\n[tasks]\ntitel = \"x\"\n",
        BASE.replace(
            "api_key = \"k\"",
            "api_key = \"k\"\ntimezon = \"Europe/Kyiv\""
        )
    );
    let (keys, msg) = problems(&text);
    for key in [
        "unitalk.timezon",
        "sync.lookbak",
        "tasks.titel",
        "sync.settle",
    ] {
        assert!(keys.iter().any(|k| k == key), "{key} missing: {msg}");
        assert_eq!(
            msg.matches(&format!("`{key}`")).count(),
            1,
            "named once: {msg}"
        );
    }
    assert_eq!(keys.len(), 4, "{msg}");
}

#[test]
fn secrets_can_come_from_the_environment() {
    let text = BASE
        .replace("api_key = \"k\"", "")
        .replace("client_secret = \"s\"", "");
    let mut env = Env::default();
    env.0
        .insert("UBSYNC_UNITALK_API_KEY".into(), "from-env".into());
    env.0
        .insert("UBSYNC_BITRIX24_CLIENT_SECRET".into(), "secret-env".into());
    let c = Config::parse(&text, Path::new("/tmp/ubsync.toml"), &env).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(c.unitalk.api_key.expose_secret(), "from-env");
    assert!(!format!("{c:?}").contains("secret-env"));
}

#[test]
fn a_relative_state_path_is_resolved_against_the_config_file_not_the_working_directory() {
    let c = Config::parse(BASE, Path::new("/etc/ubsync/ubsync.toml"), &Env::default()).unwrap();
    assert_eq!(c.state.path, Path::new("/etc/ubsync/state/ubsync.db"));
}

/// Puts the keys of `snippet` (one `[section]` plus keys) into `base`'s matching section, or
/// appends the section when `base` lacks it.
fn merge(base: &str, snippet: &str) -> String {
    let mut lines = snippet.lines();
    let header = lines.next().unwrap();
    let body: Vec<&str> = lines.collect();
    if let Some(pos) = base.find(header) {
        let insert_at = pos + header.len();
        let mut out = base.to_string();
        // Drop keys in base that the snippet overrides.
        for l in &body {
            if let Some((k, _)) = l.split_once('=') {
                let k = k.trim();
                out = out
                    .lines()
                    .filter(|bl| {
                        bl.split_once('=')
                            .map(|(bk, _)| bk.trim() != k)
                            .unwrap_or(true)
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
            }
        }
        let insert_at = out
            .find(header)
            .map(|p| p + header.len())
            .unwrap_or(insert_at);
        out.insert_str(insert_at, &format!("\n{}", body.join("\n")));
        out
    } else {
        format!("{base}\n{snippet}\n")
    }
}

#[test]
fn the_shipped_example_config_is_valid_and_documents_every_key() {
    let text = include_str!("../../ubsync.example.toml");
    let c = Config::parse(text, Path::new("/etc/ubsync/ubsync.toml"), &Env::default()).unwrap();
    assert_eq!(c.bitrix24.burst.get(), 50);
    for key in [
        "base_url",
        "api_key",
        "timezone",
        "mode",
        "portal_url",
        "client_id",
        "client_secret",
        "oauth_url",
        "webhook_url",
        "burst",
        "per_second",
        "path",
    ] {
        assert!(text.contains(&format!("{key} =")), "example lacks {key}");
    }
}

#[test]
fn secrets_can_come_from_files_and_systemd_credentials_and_state_from_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.txt"), "file-key\n").unwrap();
    std::fs::write(dir.path().join("bitrix24_client_secret"), "cred-secret\n").unwrap();
    let text = BASE
        .replace(
            "api_key = \"k\"",
            &format!(
                "api_key_file = \"{}\"",
                dir.path().join("key.txt").display()
            ),
        )
        .replace("client_secret = \"s\"", "");
    let mut env = Env::default();
    env.0.insert(
        "CREDENTIALS_DIRECTORY".into(),
        dir.path().display().to_string(),
    );
    env.0
        .insert("STATE_DIRECTORY".into(), "/var/lib/ubsync".into());
    let c = Config::parse(&text, Path::new("/etc/ubsync/ubsync.toml"), &env).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(c.unitalk.api_key.expose_secret(), "file-key");
    assert_eq!(
        c.bitrix24.client_secret.unwrap().expose_secret(),
        "cred-secret"
    );
    assert_eq!(c.state.path, Path::new("/var/lib/ubsync/state/ubsync.db"));

    let missing = BASE.replace("api_key = \"k\"", "api_key_file = \"/nonexistent/key\"");
    let (keys, msg) = problems(&missing);
    assert_eq!(keys, vec!["unitalk.api_key_file"]);
    assert!(msg.contains("/nonexistent/key"), "{msg}");
}
