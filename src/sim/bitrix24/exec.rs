//! What the portal does with a request once it is routed: the leaky bucket, the operating
//! budget and its billing, injected faults, and executing one command or a batch.

use super::*;

impl PortalState {
    pub(super) fn mint_tokens(&mut self, user_id: u64, now: DateTime<Utc>) -> (String, String) {
        self.token_seq += 1;
        let access = format!(
            "sim-access-{:08x}{:04}",
            rand::random::<u32>(),
            self.token_seq
        );
        let refresh = format!(
            "sim-refresh-{:08x}{:04}",
            rand::random::<u32>(),
            self.token_seq
        );
        self.access_tokens.insert(
            access.clone(),
            AccessToken {
                user_id,
                expires_at: now + self.cfg.token_ttl,
            },
        );
        self.refresh_tokens.insert(refresh.clone(), user_id);
        (access, refresh)
    }

    /// Leaky bucket (§2.1): drains continuously, refuses once full.
    pub(super) fn admit(&mut self, now: DateTime<Utc>) -> bool {
        if let Some(at) = self.bucket_at {
            let elapsed = (now - at).num_microseconds().unwrap_or(0) as f64 / 1e6;
            self.bucket_level =
                (self.bucket_level - elapsed.max(0.0) * self.cfg.drain_per_sec).max(0.0);
        }
        self.bucket_at = Some(now);
        if self.bucket_level + 1.0 > self.cfg.burst + 1e-9 {
            return false;
        }
        self.bucket_level += 1.0;
        true
    }

    pub(super) fn live_buckets(
        &mut self,
        key: &(String, String),
        now: DateTime<Utc>,
    ) -> &mut OperatingBuckets {
        let buckets = self.operating.entry(key.clone()).or_default();
        buckets.retain(|(opened, _)| *opened + Duration::minutes(10) > now);
        buckets
    }

    /// §2.2: whether `method` is blocked for `caller` right now.
    pub(super) fn operating_blocked(
        &mut self,
        caller: &Caller,
        method: &str,
        now: DateTime<Utc>,
    ) -> bool {
        let limit = self.cfg.operating_limit;
        let key = (caller.budget_key(), method.to_string());
        let used: f64 = self.live_buckets(&key, now).iter().map(|(_, s)| s).sum();
        used > limit
    }

    /// The simulated execution time of one call of `method`.
    pub(super) fn cost(&self, method: &str) -> f64 {
        self.cfg
            .method_costs
            .get(method)
            .copied()
            .unwrap_or(self.cfg.default_cost)
    }

    /// Bills one execution of `method`; returns (operating, operating_reset_at).
    pub(super) fn bill(&mut self, caller: &Caller, method: &str, now: DateTime<Utc>) -> (f64, i64) {
        let cost = self.cost(method);
        self.bill_cost(caller, method, cost, now)
    }

    pub(super) fn bill_cost(
        &mut self,
        caller: &Caller,
        method: &str,
        cost: f64,
        now: DateTime<Utc>,
    ) -> (f64, i64) {
        let key = (caller.budget_key(), method.to_string());
        let buckets = self.live_buckets(&key, now);
        match buckets.last_mut() {
            Some((opened, secs)) if now - *opened < Duration::minutes(1) => *secs += cost,
            _ => buckets.push((now, cost)),
        }
        let used = buckets.iter().map(|(_, s)| s).sum();
        let reset = buckets[0].0 + Duration::minutes(10);
        (used, reset.timestamp())
    }

    pub(super) fn take_fault(&mut self, method: &str, commands: &[String]) -> Option<FaultKind> {
        let i = self.faults.iter().position(|f| match &f.method {
            None => true,
            Some(m) => m == method || commands.iter().any(|c| c == m),
        })?;
        let f = &mut self.faults[i];
        let kind = f.kind.clone();
        f.remaining -= 1;
        if f.remaining == 0 {
            self.faults.remove(i);
        }
        Some(kind)
    }

    pub(super) fn time_obj(&self, start: DateTime<Utc>, operating: Option<(f64, i64)>) -> Value {
        let tz = self.cfg.timezone;
        let s = start.timestamp_micros() as f64 / 1e6;
        let mut t = json!({
            "start": s, "finish": s + 0.012, "duration": 0.012, "processing": 0.004,
            "date_start": start.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            "date_finish": start.with_timezone(&tz).to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        });
        if let Some((op, reset)) = operating {
            t["operating_reset_at"] = json!(reset);
            t["operating"] = json!(op);
        }
        t
    }

    /// Runs one method (outside or inside a batch), with the operating check and billing.
    pub(super) fn execute(
        &mut self,
        caller: &Caller,
        method: &str,
        params: &Map<String, Value>,
        now: DateTime<Utc>,
        in_batch: bool,
    ) -> (ApiResult, Option<(f64, i64)>) {
        if in_batch
            && (method == "batch"
                || (method == "telephony.externalcall.attachrecord"
                    && !self.cfg.attach_record_in_batch))
        {
            return (
                Err(ApiError::new(
                    405,
                    "ERROR_BATCH_METHOD_NOT_ALLOWED",
                    "Method is not allowed for batch usage",
                )),
                None,
            );
        }
        // Billed to the batch instead: no per-method budget inside it.
        let own_budget = !in_batch || self.cfg.batch_billing == BatchBilling::PerMethod;
        if own_budget && self.operating_blocked(caller, method, now) {
            return (
                Err(ApiError::new(
                    429,
                    "OPERATION_TIME_LIMIT",
                    "Method is blocked due to operation time limit.",
                )),
                None,
            );
        }
        let r = methods::dispatch(self, caller, method, params, now);
        let billed = match &r {
            Err(e) if e.code == "ERROR_METHOD_NOT_FOUND" => None,
            _ if !own_budget => None,
            _ => Some(self.bill(caller, method, now)),
        };
        (r, billed)
    }

    pub(super) fn batch(
        &mut self,
        caller: &Caller,
        params: &Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Result<(Value, f64), ApiError> {
        let cmd = get_ci(params, "cmd").cloned().unwrap_or(Value::Null);
        let commands: Vec<(String, String)> = match cmd {
            Value::Object(m) => m.into_iter().map(|(k, v)| (k, scalar(&v))).collect(),
            Value::Array(a) => a
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), scalar(&v)))
                .collect(),
            _ => Vec::new(),
        };
        if commands.len() > 50 {
            return Err(ApiError::new(
                400,
                "ERROR_BATCH_LENGTH_EXCEEDED",
                "Max batch length exceeded",
            ));
        }
        let halt = get_ci(params, "halt").map(truthy).unwrap_or(false);
        let mut cost = 0.0;
        let mut results = Map::new();
        let mut errors = Map::new();
        let mut totals = Map::new();
        let mut nexts = Map::new();
        let mut times = Map::new();
        for (key, command) in commands {
            let (method, query) = command.split_once('?').unwrap_or((command.as_str(), ""));
            let method = normalize_method(method);
            let mut sub = phpquery::parse(query);
            substitute_refs(&mut sub, &results);
            cost += self.cost(&method);
            let (r, billed) = self.execute(caller, &method, &sub, now, true);
            match r {
                Ok(ok) => {
                    if let Some(t) = ok.total {
                        totals.insert(key.clone(), json!(t));
                    }
                    if let Some(n) = ok.next {
                        nexts.insert(key.clone(), json!(n));
                    }
                    times.insert(key.clone(), self.time_obj(now, billed));
                    results.insert(key, ok.result);
                }
                Err(e) => {
                    errors.insert(key, e.body());
                    if halt {
                        break;
                    }
                }
            }
        }
        let php = |m: Map<String, Value>| {
            if m.is_empty() {
                json!([])
            } else {
                phpquery::php_arrays_to_lists_shallow(Value::Object(m))
            }
        };
        Ok((
            json!({
                "result": php(results),
                "result_error": php(errors),
                "result_total": php(totals),
                "result_next": php(nexts),
                "result_time": php(times),
            }),
            cost,
        ))
    }
}
