//! The scripting hook (`rules.script`): an embedded rhai script for what declarative rules cannot
//! say. One optional function per stage — `filter(call)`, `client_number(call, number)`,
//! `register(call, params)`, `finish(call, params)`, `task(call, fields)`,
//! `activity(call, fields)` (name the parameters anything but `call`, a rhai keyword: `c`) —
//! each receiving the call (and the planned fields) as maps and
//! returning the changed ones. Sandboxed: `import` and `eval` do not compile and no module
//! resolver is installed, so a script reaches no file and no network; an operation limit,
//! size limits and a time limit bound every run; `print` goes to the log (20 lines of 500
//! characters a run at most). A script error
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
    /// Lines printed by the running function (reset at each run).
    prints: Arc<std::sync::atomic::AtomicU32>,
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

/// Lines of `print`/`debug` one function run may write to the log; more are dropped (with one
/// line saying so), so a script cannot flood the journal.
const PRINT_LINES: u32 = 20;
/// Characters of one printed line kept in the log.
const PRINT_CHARS: usize = 500;

/// The symbols a script may not use, each a way out of the sandbox: `import` loads a file
/// (rhai's default resolver reads `NAME.rhai` beside the working directory, or any absolute
/// path), `eval` compiles text at run time past every check made at load.
const DISABLED: &[(&str, &str)] = &[
    ("import", "a script cannot import modules (no file access)"),
    (
        "eval",
        "a script cannot eval text (everything is compiled at load)",
    ),
];

/// One printed line for the log: cut to `PRINT_CHARS`, and counted against `PRINT_LINES`.
fn printed(printed: &std::sync::atomic::AtomicU32, text: &str) -> Option<String> {
    let n = printed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if n > PRINT_LINES {
        return None;
    }
    if n == PRINT_LINES {
        return Some(format!(
            "(further output of this run dropped: at most {PRINT_LINES} lines a run)"
        ));
    }
    let mut line: String = text.chars().take(PRINT_CHARS).collect();
    if line.len() < text.len() {
        line.push('…');
    }
    Some(line)
}

fn engine(
    max_operations: u64,
    started: Arc<std::sync::Mutex<Instant>>,
    prints: Arc<std::sync::atomic::AtomicU32>,
) -> Engine {
    let mut e = Engine::new();
    // No module may be loaded from anywhere, whatever `import` is spelled as.
    e.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    for (symbol, _) in DISABLED {
        e.disable_symbol(*symbol);
    }
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
    let p = prints.clone();
    e.on_print(move |s| {
        if let Some(line) = printed(&p, s) {
            tracing::info!(target: "ubsync::script", "{line}")
        }
    });
    e.on_debug(move |s, _, _| {
        if let Some(line) = printed(&prints, s) {
            tracing::debug!(target: "ubsync::script", "{line}")
        }
    });
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
        let prints = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let engine = engine(max_operations, started.clone(), prints.clone());
        let ast = engine.compile(&source).map_err(|e| {
            let why = DISABLED
                .iter()
                .find(|(symbol, _)| e.to_string().contains(&format!("'{symbol}'")))
                .map(|(_, why)| format!(": {why}"))
                .unwrap_or_default();
            format!("{}: {e}{why}", path.display())
        })?;
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
            prints,
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
        self.prints.store(0, std::sync::atomic::Ordering::Relaxed);
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

    #[test]
    fn no_import_of_any_file_compiles_relative_or_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.rhai");
        std::fs::write(&secret, "export const token = \"s3cr3t\";").unwrap();
        let relative = dir.path().join("rel.rhai");
        std::fs::write(
            &relative,
            "import \"secret\" as s;\nfn filter(c) { s::token }",
        )
        .unwrap();
        let absolute = dir.path().join("abs.rhai");
        std::fs::write(
            &absolute,
            format!(
                "fn filter(c) {{ import \"{}\" as s; s::token }}",
                secret.with_extension("").display()
            ),
        )
        .unwrap();
        let rel = Script::load(&relative, 10_000);
        let abs = Script::load(&absolute, 10_000);
        for e in [rel.unwrap_err(), abs.unwrap_err()] {
            assert!(e.contains("cannot import modules"), "{e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }

    #[test]
    fn eval_recursion_and_huge_values_are_bounded() {
        let e = script(r#"fn filter(c) { eval("true") }"#).unwrap_err();
        assert!(e.contains("cannot eval"), "{e}");
        let s = script("fn f(n) { f(n + 1) } fn filter(c) { f(0) }").unwrap();
        assert!(s.filter(&call()).is_err(), "deep recursion stops");
        let s = script(r#"fn filter(c) { let s = "x"; loop { s += s; } }"#).unwrap();
        assert!(
            s.filter(&call()).is_err(),
            "a string cannot grow without end"
        );
        let s = script("fn filter(c) { let a = []; loop { a.push(1); } }").unwrap();
        assert!(
            s.filter(&call()).is_err(),
            "an array cannot grow without end"
        );
    }

    #[test]
    fn print_flooding_is_cut_to_a_few_short_lines_a_run() {
        let n = std::sync::atomic::AtomicU32::new(0);
        let long = "y".repeat(10_000);
        let lines: Vec<_> = (0..1000).filter_map(|_| printed(&n, &long)).collect();
        assert_eq!(lines.len() as u32, PRINT_LINES + 1);
        assert!(lines[0].chars().count() <= PRINT_CHARS + 1);
        assert!(lines.last().unwrap().contains("dropped"));
        // Through the engine: a script printing in a loop still answers, and the counter
        // starts again at the next run.
        let s =
            script(r#"fn filter(c) { for i in 0..300 { print("flood " + i); } true }"#).unwrap();
        assert_eq!(s.filter(&call()).unwrap(), None);
        assert_eq!(
            s.prints.load(std::sync::atomic::Ordering::Relaxed),
            300,
            "every line was counted"
        );
        assert_eq!(s.filter(&call()).unwrap(), None);
    }
}
