//! The scripting hook (`rules.script`): an embedded rhai script for what declarative rules cannot
//! say. One optional function per stage — `filter(call)`, `client_number(call, number)`,
//! `register(call, params)`, `finish(call, params)`, `task(call, fields)`,
//! `activity(call, fields)` (name the parameters anything but `call`, a rhai keyword: `c`) —
//! each receiving the call (and the planned fields) as maps and
//! returning the changed ones. Sandboxed: rhai has no file or network access; an operation limit,
//! size limits and a time limit bound every run; `print` goes to the log. A script error
//! quarantines that call with the script's message; it never stops the pass.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::{Dynamic, Engine, Scope, AST};
use serde_json::{json, Value};

use crate::sync::call::{CallFacts, Way};

/// The stages a script may define, with their arity.
pub const STAGES: &[(&str, usize)] = &[
    ("filter", 1),
    ("client_number", 2),
    ("register", 2),
    ("finish", 2),
    ("task", 2),
    ("activity", 2),
];

/// Wall-clock bound of one function run (the operation limit is the deterministic one).
const TIME_LIMIT: Duration = Duration::from_secs(2);

/// A compiled script.
#[derive(Clone)]
pub struct Script {
    engine: Arc<Engine>,
    /// When the running function started (the engine's progress callback reads it).
    started: Arc<std::sync::Mutex<Instant>>,
    ast: Arc<AST>,
    path: PathBuf,
    defined: HashSet<&'static str>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("path", &self.path)
            .field("defined", &self.defined)
            .finish()
    }
}

fn engine(max_operations: u64, started: Arc<std::sync::Mutex<Instant>>) -> Engine {
    let mut e = Engine::new();
    e.on_progress(move |_| {
        let since = started.lock().map(|t| t.elapsed()).unwrap_or_default();
        (since > TIME_LIMIT).then(|| Dynamic::from("time limit"))
    });
    e.set_max_operations(max_operations);
    e.set_max_call_levels(32);
    e.set_max_expr_depths(64, 32);
    e.set_max_string_size(256 * 1024);
    e.set_max_array_size(10_000);
    e.set_max_map_size(10_000);
    e.on_print(|s| tracing::info!(target: "ubsync::script", "{s}"));
    e.on_debug(|s, _, _| tracing::debug!(target: "ubsync::script", "{s}"));
    e
}

/// A call as a script sees it.
pub fn call_map(f: &CallFacts, raw: Option<&Value>) -> Value {
    json!({
        "id": f.id,
        "external_id": f.external_id,
        "direction": if f.way == Way::In { "in" } else { "out" },
        "client": f.client_number,
        "line": f.operator_line,
        "outer": f.outer,
        "group": f.group,
        "state": f.state.as_str(),
        "talk": f.seconds_talk,
        "duration": f.seconds_full,
        "started": f.started_at.to_rfc3339(),
        "missed": f.missed,
        "recording": f.link,
        "raw": raw.cloned().unwrap_or(Value::Null),
    })
}

impl Script {
    /// Reads and compiles `path`; the error names the file, line and position.
    pub fn load(path: &Path, max_operations: u64) -> Result<Self, String> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {} ({e})", path.display()))?;
        let started = Arc::new(std::sync::Mutex::new(Instant::now()));
        let engine = engine(max_operations, started.clone());
        let ast = engine
            .compile(&source)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut defined = HashSet::new();
        for f in ast.iter_functions() {
            if let Some((name, arity)) = STAGES.iter().find(|(n, _)| *n == f.name) {
                if f.params.len() != *arity {
                    return Err(format!(
                        "{}: fn {name} takes {arity} parameter(s), not {}",
                        path.display(),
                        f.params.len()
                    ));
                }
                defined.insert(*name);
            }
        }
        Ok(Self {
            engine: Arc::new(engine),
            started,
            ast: Arc::new(ast),
            path: path.to_path_buf(),
            defined,
        })
    }

    pub fn defines(&self, stage: &str) -> bool {
        self.defined.contains(stage)
    }

    fn run(&self, stage: &str, args: Vec<Dynamic>) -> Result<Dynamic, String> {
        if let Ok(mut t) = self.started.lock() {
            *t = Instant::now();
        }
        let mut scope = Scope::new();
        self.engine
            .call_fn::<Dynamic>(&mut scope, &self.ast, stage, args)
            .map_err(|e| format!("script {} fn {stage}: {e}", self.path.display()))
    }

    fn dynamic(v: &Value) -> Result<Dynamic, String> {
        rhai::serde::to_dynamic(v).map_err(|e| e.to_string())
    }

    /// `filter(call)`: `None` to push; `Some(reason)` when the script returns `false` or a
    /// reason text.
    pub fn filter(&self, call: &Value) -> Result<Option<String>, String> {
        if !self.defines("filter") {
            return Ok(None);
        }
        let out = self.run("filter", vec![Self::dynamic(call)?])?;
        if out.is_unit() {
            return Ok(None);
        }
        if let Ok(b) = out.as_bool() {
            return Ok((!b).then(|| "the script's filter".to_string()));
        }
        if out.is_string() {
            let reason = out.into_string().unwrap_or_default();
            return Ok(Some(if reason.trim().is_empty() {
                "the script's filter".into()
            } else {
                reason
            }));
        }
        Err(format!(
            "script {} fn filter: returned {}; return true, false or a reason",
            self.path.display(),
            out.type_name()
        ))
    }

    /// `client_number(call, number)`: the number to read as E.164.
    pub fn client_number(&self, call: &Value, number: &str) -> Result<String, String> {
        if !self.defines("client_number") {
            return Ok(number.to_string());
        }
        let out = self.run(
            "client_number",
            vec![Self::dynamic(call)?, Dynamic::from(number.to_string())],
        )?;
        if out.is_unit() {
            return Ok(number.to_string());
        }
        out.into_string().map_err(|t| {
            format!(
                "script {} fn client_number: returned {t}; return a string",
                self.path.display()
            )
        })
    }

    /// `register`/`finish`/`task`/`activity(call, fields)`: the fields after the script (the
    /// returned map's keys replace the planned ones; a key set to `()` removes it).
    pub fn fields(&self, stage: &str, call: &Value, fields: &Value) -> Result<Value, String> {
        if !self.defines(stage) {
            return Ok(fields.clone());
        }
        let out = self.run(stage, vec![Self::dynamic(call)?, Self::dynamic(fields)?])?;
        if out.is_unit() {
            return Ok(fields.clone());
        }
        let changed: Value = rhai::serde::from_dynamic(&out).map_err(|e| {
            format!(
                "script {} fn {stage}: returned something that is not a map of fields ({e})",
                self.path.display()
            )
        })?;
        let Value::Object(changed) = changed else {
            return Err(format!(
                "script {} fn {stage}: returned {}; return the map of fields",
                self.path.display(),
                out.type_name()
            ));
        };
        let mut merged = fields.as_object().cloned().unwrap_or_default();
        for (k, v) in changed {
            if v.is_null() {
                merged.remove(&k);
            } else {
                merged.insert(k, v);
            }
        }
        Ok(Value::Object(merged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(text: &str) -> Result<Script, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.rhai");
        std::fs::write(&p, text).unwrap();
        Script::load(&p, 10_000)
    }

    fn call() -> Value {
        json!({"id": "7", "client": "+380501112233", "group": "Spam", "direction": "in", "talk": 0})
    }

    #[test]
    fn each_stage_changes_what_it_returns() {
        let s = script(
            r#"
            fn filter(c) { if c.group == "Spam" { return "spam queue"; } true }
            fn client_number(c, n) { if n.starts_with("8") { "+3" + n } else { n } }
            fn task(c, f) { f.TITLE = "Call back " + c.client; f.PRIORITY = 2; f.DROP = (); f }
            "#,
        )
        .unwrap();
        assert_eq!(s.filter(&call()).unwrap().as_deref(), Some("spam queue"));
        let mut other = call();
        other["group"] = json!("Sales");
        assert_eq!(s.filter(&other).unwrap(), None);
        assert_eq!(
            s.client_number(&call(), "80501112233").unwrap(),
            "+380501112233"
        );
        let f = s
            .fields(
                "task",
                &call(),
                &json!({"TITLE": "x", "DROP": 1, "KEEP": "k"}),
            )
            .unwrap();
        assert_eq!(
            f,
            json!({"TITLE": "Call back +380501112233", "PRIORITY": 2, "KEEP": "k"})
        );
        assert_eq!(
            s.fields("register", &call(), &json!({"A": 1})).unwrap(),
            json!({"A": 1}),
            "an undefined stage changes nothing"
        );
    }

    #[test]
    fn runaway_and_broken_scripts_are_errors_not_hangs() {
        let s = script("fn filter(c) { loop { } }").unwrap();
        let e = s.filter(&call()).unwrap_err();
        assert!(e.contains("fn filter"), "{e}");
        let s = script("fn task(c, f) { f.missing.thing }").unwrap();
        assert!(s.fields("task", &call(), &json!({})).is_err());
        let e = script("fn filter(c) { ").unwrap_err();
        assert!(e.contains("r.rhai"), "{e}");
        let e = script("fn task(c) { c }").unwrap_err();
        assert!(e.contains("takes 2 parameter"), "{e}");
        // No file access: rhai has no such function.
        let s = script(r#"fn filter(c) { open_file("/etc/passwd") }"#).unwrap();
        assert!(s.filter(&call()).is_err());
    }
}
