//! Compiling and running `rules/*.rhai` in a sandboxed rhai engine.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rhai::module_resolvers::DummyModuleResolver;
use rhai::{AST, CallFnOptions, Dynamic, Engine, EvalAltResult, Position, Scope};

use crate::config::{OnError, Problem, RulesConfig};
use crate::policy::metrics::{PolicyMetrics, ScriptMetrics};
use crate::policy::script_api::{self, Msg, ScriptVerdict};
use crate::policy::types::{Call, Verdict};

/// The stage functions, in the order of an SMTP transaction.
pub const STAGES: [&str; 4] = ["connect", "mail_from", "rcpt", "data"];

/// Wall-clock bound of one script call, on top of `max_operations`.
pub const CALL_TIME_LIMIT: Duration = Duration::from_secs(2);

thread_local! {
    /// When the script call running on this thread must stop.
    static CALL_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// One compiled script.
pub(crate) struct Script {
    /// The file name, e.g. `10-auth.rhai`.
    pub(crate) name: String,
    ast: AST,
    /// Which of [`STAGES`] it defines.
    stages: [bool; 4],
    /// `*.shadow.rhai`: its verdicts are counted and traced, never applied.
    pub(crate) shadow: bool,
    /// Its time and verdict series.
    metrics: ScriptMetrics,
}

impl Script {
    pub(crate) fn defines(&self, function: &str) -> bool {
        STAGES
            .iter()
            .position(|s| *s == function)
            .is_some_and(|i| self.stages[i])
    }
}

/// The compiled scripts of one rule set with the engine that runs them.
pub(crate) struct Rules {
    engine: Engine,
    pub(crate) scripts: Vec<Script>,
    pub(crate) config: RulesConfig,
}

/// How one stage ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct StageResult {
    pub(crate) verdict: Option<Verdict>,
    pub(crate) script: Option<String>,
    /// The error, when the verdict comes from `on_error`.
    pub(crate) error: Option<String>,
    /// Every call made, shadow scripts included, for the trace.
    pub(crate) calls: Vec<Call>,
}

/// What a stage function gets: `c`, or `m` (whose score and added headers
/// a shadow script must not touch).
pub(crate) enum StageArg {
    Conn(Dynamic),
    Msg(Msg),
}

/// The shadow-script suffix.
pub(crate) const SHADOW_SUFFIX: &str = ".shadow.rhai";

/// The sandboxed engine: no modules, no eval, output to tracing, bounded.
pub(crate) fn new_engine(config: &RulesConfig) -> Engine {
    let mut engine = Engine::new();
    engine.set_module_resolver(DummyModuleResolver::new());
    engine.disable_symbol("eval");
    engine.set_max_operations(config.max_operations.max(1));
    engine.set_max_call_levels(32);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(4 << 20);
    engine.set_max_array_size(10_000);
    engine.set_max_map_size(10_000);
    engine.set_max_variables(1_000);
    engine.set_max_functions(1_000);
    engine.set_max_modules(0);
    engine.on_print(|text| tracing::info!(target: "postern::rules", "print: {text}"));
    engine.on_debug(|text, source, pos| {
        tracing::debug!(target: "postern::rules", script = source.unwrap_or("?"), line = pos.line(), "debug: {text}");
    });
    engine.on_progress(|ops| {
        if ops % 1024 == 0
            && let Some(deadline) = CALL_DEADLINE.get()
            && Instant::now() > deadline
        {
            return Some(Dynamic::from("script time limit exceeded"));
        }
        None
    });
    script_api::register(&mut engine);
    engine
}

/// Lists `dir/*.rhai` in file-name order.
fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, Problem> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Problem::new(dir, None, format!("cannot read the rules directory: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rhai") && p.is_file())
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

fn position_line(pos: Position) -> Option<usize> {
    pos.line()
}

impl Rules {
    /// Compiles every `*.rhai` in `config.dir`; all problems at once.
    pub(crate) fn load(config: RulesConfig, metrics: &PolicyMetrics) -> Result<Self, Vec<Problem>> {
        let engine = new_engine(&config);
        let files = rule_files(&config.dir).map_err(|p| vec![p])?;
        let mut problems = Vec::new();
        let mut scripts = Vec::new();
        for path in files {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(Problem::new(&path, None, format!("cannot read: {e}")));
                    continue;
                }
            };
            let mut ast = match engine.compile(&source) {
                Ok(ast) => ast,
                Err(e) => {
                    problems.push(Problem::new(&path, position_line(e.1), e.0.to_string()));
                    continue;
                }
            };
            ast.set_source(name.as_str());
            let mut stages = [false; 4];
            let mut bad = false;
            for f in ast.iter_functions() {
                if let Some(i) = STAGES.iter().position(|s| *s == f.name) {
                    if f.params.len() == 1 {
                        stages[i] = true;
                    } else {
                        bad = true;
                        problems.push(Problem::new(
                            &path,
                            None,
                            format!(
                                "fn {}() must take exactly one parameter, it takes {}",
                                f.name,
                                f.params.len()
                            ),
                        ));
                    }
                }
            }
            if !bad {
                scripts.push(Script {
                    metrics: metrics.script(&name),
                    shadow: name.ends_with(SHADOW_SUFFIX),
                    name,
                    ast,
                    stages,
                });
            }
        }
        if problems.is_empty() {
            Ok(Self {
                engine,
                scripts,
                config,
            })
        } else {
            Err(problems)
        }
    }

    pub(crate) fn defines(&self, function: &str) -> bool {
        self.scripts.iter().any(|s| s.defines(function))
    }

    /// Calls `function(arg)` of one script: its verdict, nothing, or an error.
    fn call(
        &self,
        script: &Script,
        function: &str,
        arg: Dynamic,
    ) -> Result<Option<Verdict>, String> {
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let mut scope = Scope::new();
        let previous = CALL_DEADLINE.replace(Some(Instant::now() + CALL_TIME_LIMIT));
        let result: Result<Dynamic, Box<EvalAltResult>> =
            self.engine
                .call_fn_with_options(options, &mut scope, &script.ast, function, (arg,));
        CALL_DEADLINE.set(previous);
        match result {
            Ok(value) if value.is_unit() => Ok(None),
            Ok(value) => match value.try_cast::<ScriptVerdict>() {
                Some(v) => Ok(Some(v.0)),
                None => Err(format!(
                    "{function}() returned a value that is not a verdict (use accept(), reject(), tempfail(), quarantine(), discard() or nothing)"
                )),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    /// Runs `function` of every script that defines it, in file-name order,
    /// until one returns a verdict. Errors take the `on_error` path. A
    /// shadow script runs at its place and is traced and counted, but its
    /// verdict, score and headers are never applied.
    pub(crate) fn run_stage(&self, function: &str, arg: &StageArg) -> StageResult {
        let mut out = StageResult::default();
        for script in self.scripts.iter().filter(|s| s.defines(function)) {
            // Live calls share `m`'s effects; a shadow call gets its own.
            let (value, msg) = match arg {
                StageArg::Conn(c) => (c.clone(), None),
                StageArg::Msg(m) if script.shadow => {
                    let own = m.detached();
                    (Dynamic::from(own.clone()), Some(own))
                }
                StageArg::Msg(m) => (Dynamic::from(m.clone()), Some(m.clone())),
            };
            let before = msg.as_ref().map(Msg::effects_mark);
            let started = Instant::now();
            let result = self.call(script, function, value);
            let elapsed = started.elapsed();
            let mut call = Call {
                script: script.name.clone(),
                shadow: script.shadow,
                micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                ..Call::default()
            };
            if let (Some(m), Some(mark)) = (&msg, before) {
                (call.score, call.headers) = m.effects_since(mark);
            }
            let seconds = elapsed.as_secs_f64();
            let decided = match result {
                Ok(None) => {
                    script.metrics.observe(seconds, "none");
                    call.verdict = "none".into();
                    None
                }
                Ok(Some(verdict)) => {
                    script.metrics.observe(seconds, verdict.word());
                    call.verdict = verdict.word().into();
                    call.detail = verdict_detail(&verdict);
                    Some((verdict, None))
                }
                Err(error) => {
                    script.metrics.observe(seconds, "error");
                    call.verdict = "error".into();
                    call.detail = error.clone();
                    tracing::warn!(
                        script = %script.name,
                        function,
                        shadow = script.shadow,
                        on_error = ?self.config.on_error,
                        "rule error in {}: {error}",
                        script.name
                    );
                    match self.config.on_error {
                        OnError::Accept => None,
                        OnError::Tempfail => Some((Verdict::local_tempfail(), Some(error))),
                        OnError::Quarantine => Some((
                            Verdict::Quarantine {
                                reason: format!("rule error in {}", script.name),
                            },
                            Some(error),
                        )),
                    }
                }
            };
            out.calls.push(call);
            if script.shadow {
                if let Some((verdict, _)) = &decided {
                    tracing::info!(
                        script = %script.name,
                        function,
                        verdict = verdict.word(),
                        "shadow verdict (not applied)"
                    );
                }
                continue;
            }
            if let Some((verdict, error)) = decided {
                out.verdict = Some(verdict);
                out.script = Some(script.name.clone());
                out.error = error;
                break;
            }
        }
        out
    }
}

/// The reply or reason a verdict carries, for the trace.
pub(crate) fn verdict_detail(v: &Verdict) -> String {
    match v {
        Verdict::Reject(r) | Verdict::Tempfail(r) => r.to_string(),
        Verdict::Quarantine { reason } => reason.clone(),
        Verdict::Accept | Verdict::Discard => String::new(),
    }
}
