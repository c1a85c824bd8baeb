//! Who am I in the job: the rank, the world and rank 0's address, from the variables that
//! torchrun or Slurm's `srun` set.
//!
//! Precedence (the first that applies):
//! 1. **torchrun** (also `rdrop train --nproc-per-node N`, which sets the same variables):
//!    when `RANK` or `WORLD_SIZE` is set, all of `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!    `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` are required.
//! 2. **Slurm**: when `SLURM_PROCID` is set: rank `SLURM_PROCID`, world `SLURM_NTASKS`, local
//!    rank `SLURM_LOCALID`, local world this node's entry of `SLURM_STEP_TASKS_PER_NODE`
//!    (`2(x3),1` syntax, indexed by `SLURM_NODEID`) or else `SLURM_NTASKS_PER_NODE`; rank 0's
//!    host is the first host of `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`), expanded from
//!    Slurm's hostlist syntax ([`expand_hostlist`]); `MASTER_ADDR` / `MASTER_PORT` override;
//!    the default port is `15000 + SLURM_JOB_ID mod 10000` (so that two jobs sharing a node
//!    differ). Run rdrop under `srun`: in a batch script's own shell `SLURM_NTASKS` counts
//!    tasks that no process stands for.
//! 3. **Single**: one process, rank 0 of 1.
//!
//! **Port.** `RDROP_MASTER_PORT` ([`PORT_OVERRIDE`]) overrides the rendezvous port for either
//! launcher. Recent torchrun (c10d rendezvous, `--standalone`) exports
//! `TORCHELASTIC_USE_AGENT_STORE=True` and its agent's own TCPStore already listens on
//! `MASTER_PORT`; then rdrop's rendezvous uses `MASTER_PORT + 1` (the same on every rank).

/// Which launcher started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchSource {
    /// No launcher: one process.
    Single,
    /// torchrun, or `rdrop train --nproc-per-node`.
    Torchrun,
    /// Slurm's `srun`.
    Slurm,
}

/// This process's place in a data-parallel job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldSpec {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank on this host (selects the GPU), `0..local_world_size`.
    pub local_rank: usize,
    /// Ranks on this host.
    pub local_world_size: usize,
    /// Rank 0's host (name or IP).
    pub master_addr: String,
    /// The rendezvous port on rank 0's host.
    pub master_port: u16,
    /// Where this came from.
    pub source: LaunchSource,
}

use super::error::DistError;

/// Overrides the rendezvous port whatever the launcher (e.g. when `MASTER_PORT` is taken).
pub const PORT_OVERRIDE: &str = "RDROP_MASTER_PORT";

/// The default rendezvous address of a single process (never used for a connection).
const LOCALHOST: &str = "127.0.0.1";

impl WorldSpec {
    /// One process: rank 0 of 1.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: LOCALHOST.into(),
            master_port: 0,
            source: LaunchSource::Single,
        }
    }

    /// More than one rank.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// `master_addr:master_port` (IPv6 literals in brackets).
    pub fn rendezvous_addr(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    /// The spec from the process environment (see the module docs).
    pub fn from_env() -> Result<Self, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The spec from variables looked up by `get` (see the module docs). Errors name the
    /// variable and its value.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut spec = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            torchrun(&get)?
        } else if get("SLURM_PROCID").is_some() {
            slurm(&get)?
        } else {
            return Ok(Self::single());
        };
        if let Some(p) = get(PORT_OVERRIDE) {
            spec.master_port = parse_port(PORT_OVERRIDE, &p)?;
        } else if spec.source == LaunchSource::Torchrun
            && get("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"))
        {
            // torchrun's agent already listens on MASTER_PORT (its TCPStore): take the next.
            spec.master_port =
                spec.master_port
                    .checked_add(1)
                    .ok_or_else(|| DistError::BadVar {
                        var: "MASTER_PORT".into(),
                        value: spec.master_port.to_string(),
                        problem: format!(
                            "torchrun's agent store holds it and there is no next port; set \
                     {PORT_OVERRIDE}"
                        ),
                    })?;
        }
        Ok(spec)
    }

    fn check(self) -> Result<Self, DistError> {
        let (rank_var, world_var, local_var, lworld_var) = match self.source {
            LaunchSource::Slurm => (
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_STEP_TASKS_PER_NODE",
            ),
            _ => ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        };
        let bad = |var: &str, value: usize, problem: String| DistError::BadVar {
            var: var.into(),
            value: value.to_string(),
            problem,
        };
        if self.world_size == 0 {
            return Err(bad(world_var, 0, "the world size must be ≥ 1".into()));
        }
        if self.rank >= self.world_size {
            return Err(bad(
                rank_var,
                self.rank,
                format!("the rank must be < {world_var} = {}", self.world_size),
            ));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return Err(bad(
                lworld_var,
                self.local_world_size,
                format!(
                    "the ranks on a host must be 1..={world_var} = {}",
                    self.world_size
                ),
            ));
        }
        if self.local_rank >= self.local_world_size {
            return Err(bad(
                local_var,
                self.local_rank,
                format!(
                    "the local rank must be < the ranks on this host ({})",
                    self.local_world_size
                ),
            ));
        }
        Ok(self)
    }
}

type Get<'a> = dyn Fn(&str) -> Option<String> + 'a;

fn required(get: &Get, var: &str, launcher: &'static str, why: &str) -> Result<String, DistError> {
    get(var).ok_or_else(|| DistError::MissingVar {
        var: var.into(),
        launcher,
        why: why.into(),
    })
}

fn parse_usize(var: &str, value: &str) -> Result<usize, DistError> {
    value
        .trim()
        .parse::<usize>()
        .map_err(|e| DistError::BadVar {
            var: var.into(),
            value: value.into(),
            problem: format!("not a non-negative integer ({e})"),
        })
}

fn parse_port(var: &str, value: &str) -> Result<u16, DistError> {
    match value.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(DistError::BadVar {
            var: var.into(),
            value: value.into(),
            problem: "not a TCP port (1..=65535)".into(),
        }),
    }
}

fn torchrun(get: &Get) -> Result<WorldSpec, DistError> {
    const L: &str = "torchrun";
    let num = |var: &str, why: &str| -> Result<usize, DistError> {
        parse_usize(var, &required(get, var, L, why)?)
    };
    let rank = num("RANK", "this process's global rank")?;
    let world_size = num("WORLD_SIZE", "the number of ranks")?;
    let local_rank = num("LOCAL_RANK", "the rank on this host, which picks the GPU")?;
    let local_world_size = num("LOCAL_WORLD_SIZE", "the number of ranks on this host")?;
    let master_addr = required(get, "MASTER_ADDR", L, "rank 0's host")?
        .trim()
        .to_string();
    let master_port = parse_port(
        "MASTER_PORT",
        &required(get, "MASTER_PORT", L, "the rendezvous port")?,
    )?;
    WorldSpec {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        source: LaunchSource::Torchrun,
    }
    .check()
}

fn slurm(get: &Get) -> Result<WorldSpec, DistError> {
    const L: &str = "Slurm";
    let num = |var: &str, why: &str| -> Result<usize, DistError> {
        parse_usize(var, &required(get, var, L, why)?)
    };
    let rank = num("SLURM_PROCID", "this task's global rank")?;
    let world_size = num("SLURM_NTASKS", "the number of tasks")?;
    let local_rank = num("SLURM_LOCALID", "the task's rank on its node")?;
    let local_world_size = if let Some(v) = get("SLURM_STEP_TASKS_PER_NODE") {
        let node = match get("SLURM_NODEID") {
            Some(n) => parse_usize("SLURM_NODEID", &n)?,
            None => 0,
        };
        let counts = expand_tasks_per_node("SLURM_STEP_TASKS_PER_NODE", &v)?;
        *counts.get(node).ok_or_else(|| DistError::BadVar {
            var: "SLURM_STEP_TASKS_PER_NODE".into(),
            value: v.clone(),
            problem: format!("lists {} node(s), SLURM_NODEID is {node}", counts.len()),
        })?
    } else if let Some(v) = get("SLURM_NTASKS_PER_NODE") {
        parse_usize("SLURM_NTASKS_PER_NODE", &v)?
    } else {
        return Err(DistError::MissingVar {
            var: "SLURM_STEP_TASKS_PER_NODE".into(),
            launcher: L,
            why: "the tasks on this node (SLURM_NTASKS_PER_NODE is not set either); run under \
                  srun"
                .into(),
        });
    };
    let master_addr = match get("MASTER_ADDR") {
        Some(a) => a.trim().to_string(),
        None => {
            let (var, list) = match get("SLURM_STEP_NODELIST") {
                Some(l) => ("SLURM_STEP_NODELIST", l),
                None => (
                    "SLURM_JOB_NODELIST",
                    required(
                        get,
                        "SLURM_JOB_NODELIST",
                        L,
                        "rank 0's host (SLURM_STEP_NODELIST and MASTER_ADDR are not set either)",
                    )?,
                ),
            };
            let hosts = expand_hostlist(&list).map_err(|problem| DistError::BadVar {
                var: var.into(),
                value: list.clone(),
                problem,
            })?;
            hosts.into_iter().next().ok_or_else(|| DistError::BadVar {
                var: var.into(),
                value: list.clone(),
                problem: "names no host".into(),
            })?
        }
    };
    let master_port = match get("MASTER_PORT") {
        Some(p) => parse_port("MASTER_PORT", &p)?,
        None => {
            let job = required(
                get,
                "SLURM_JOB_ID",
                L,
                "the default rendezvous port (MASTER_PORT is not set either)",
            )?;
            let id = parse_usize("SLURM_JOB_ID", &job)?;
            slurm_default_port(id as u64)
        }
    };
    WorldSpec {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        source: LaunchSource::Slurm,
    }
    .check()
}

/// The rendezvous port of Slurm job `job_id` when `MASTER_PORT` is not set:
/// `15000 + job_id mod 10000` (as PyTorch Lightning), so that jobs sharing a node differ.
pub fn slurm_default_port(job_id: u64) -> u16 {
    15000 + (job_id % 10000) as u16
}

/// Expands Slurm's hostlist syntax into host names, in order.
///
/// Hosts are separated by commas outside brackets; each bracket group `[a-b,c,…]` lists numbers
/// and inclusive ranges, zero-padded to the width of the range's first bound (`[08-10]` →
/// `08 09 10`); several groups in one name give every combination, leftmost slowest
/// (`n[1-2]-ib[0-1]` → `n1-ib0 n1-ib1 n2-ib0 n2-ib1`). E.g. `gpu[003-005,010],login1` →
/// `gpu003 gpu004 gpu005 gpu010 login1`. The error says what is malformed.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!("empty host name in {list:?}"));
        }
        let mut names = vec![String::new()];
        let mut rest = item;
        while let Some(open) = rest.find('[') {
            let close = rest[open..]
                .find(']')
                .map(|c| open + c)
                .ok_or_else(|| format!("unclosed '[' in {item:?}"))?;
            let prefix = &rest[..open];
            if prefix.contains(']') {
                return Err(format!("unmatched ']' in {item:?}"));
            }
            let values =
                expand_ranges(&rest[open + 1..close]).map_err(|e| format!("{e} in {item:?}"))?;
            names = names
                .iter()
                .flat_map(|n| values.iter().map(move |v| format!("{n}{prefix}{v}")))
                .collect();
            rest = &rest[close + 1..];
        }
        if rest.contains(']') {
            return Err(format!("unmatched ']' in {item:?}"));
        }
        hosts.extend(names.into_iter().map(|n| n + rest));
    }
    Ok(hosts)
}

/// Splits at commas that are not inside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err(format!("nested '[' in {list:?}")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(format!("unmatched ']' in {list:?}")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(format!("unclosed '[' in {list:?}"));
    }
    out.push(&list[start..]);
    Ok(out)
}

/// `003-005,010` → `["003", "004", "005", "010"]`.
fn expand_ranges(spec: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let num = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                Err(format!("bad range {part:?} (expected N or N-M)"))
            } else {
                s.parse::<u64>()
                    .map_err(|_| format!("number too large in {part:?}"))
            }
        };
        let (a, b) = (num(lo)?, num(hi)?);
        if b < a {
            return Err(format!("decreasing range {part:?}"));
        }
        if b - a > 100_000 {
            return Err(format!("range {part:?} is too long"));
        }
        let width = lo.len();
        out.extend((a..=b).map(|v| format!("{v:0width$}")));
    }
    Ok(out)
}

/// Slurm's tasks-per-node syntax: `2(x3),1` → `[2, 2, 2, 1]`.
fn expand_tasks_per_node(var: &str, value: &str) -> Result<Vec<usize>, DistError> {
    let bad = |problem: String| DistError::BadVar {
        var: var.into(),
        value: value.into(),
        problem,
    };
    let mut out = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        let (n, reps) = match part.split_once("(x") {
            Some((n, r)) => {
                let r = r
                    .strip_suffix(')')
                    .ok_or_else(|| bad(format!("expected N or N(xK), got {part:?}")))?;
                (n, r)
            }
            None => (part, "1"),
        };
        let n: usize = n
            .parse()
            .map_err(|_| bad(format!("expected N or N(xK), got {part:?}")))?;
        let reps: usize = reps
            .parse()
            .map_err(|_| bad(format!("expected N or N(xK), got {part:?}")))?;
        if reps > 100_000 {
            return Err(bad(format!("{part:?} repeats too often")));
        }
        out.extend(std::iter::repeat_n(n, reps));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "5"),
        ("WORLD_SIZE", "16"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node-a"),
        ("MASTER_PORT", "29500"),
    ];

    const SLURM: &[(&str, &str)] = &[
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
        ("SLURM_STEP_NODELIST", "gpu[003-004]"),
        ("SLURM_JOB_NODELIST", "other[1-9]"),
        ("SLURM_JOB_ID", "4242117"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        over: &[(&'static str, &'static str)],
    ) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = base
            .iter()
            .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        v.extend(over.iter().filter(|(_, val)| !val.is_empty()).copied());
        v
    }

    fn without(
        base: &[(&'static str, &'static str)],
        var: &str,
    ) -> Vec<(&'static str, &'static str)> {
        base.iter().filter(|(k, _)| *k != var).copied().collect()
    }

    #[test]
    fn nothing_set_is_a_single_process() {
        let w = WorldSpec::from_vars(vars(&[("SLURM_JOB_ID", "12"), ("HOME", "/x")])).unwrap();
        assert_eq!(w, WorldSpec::single());
        assert!(!w.is_distributed());
    }

    #[test]
    fn torchrun_variables() {
        let w = WorldSpec::from_vars(vars(TORCHRUN)).unwrap();
        assert_eq!(
            w,
            WorldSpec {
                rank: 5,
                world_size: 16,
                local_rank: 1,
                local_world_size: 4,
                master_addr: "node-a".into(),
                master_port: 29500,
                source: LaunchSource::Torchrun,
            }
        );
        assert_eq!(w.rendezvous_addr(), "node-a:29500");
        let v6 = WorldSpec::from_vars(vars(&with(TORCHRUN, &[("MASTER_ADDR", "::1")]))).unwrap();
        assert_eq!(v6.rendezvous_addr(), "[::1]:29500");
    }

    #[test]
    fn port_override_and_torchrun_agent_store() {
        let w = WorldSpec::from_vars(vars(&with(
            TORCHRUN,
            &[("TORCHELASTIC_USE_AGENT_STORE", "True")],
        )))
        .unwrap();
        assert_eq!(w.master_port, 29501);
        let w = WorldSpec::from_vars(vars(&with(
            TORCHRUN,
            &[("TORCHELASTIC_USE_AGENT_STORE", "False")],
        )))
        .unwrap();
        assert_eq!(w.master_port, 29500);
        let w = WorldSpec::from_vars(vars(&with(
            TORCHRUN,
            &[
                ("TORCHELASTIC_USE_AGENT_STORE", "1"),
                (PORT_OVERRIDE, "31000"),
            ],
        )))
        .unwrap();
        assert_eq!(w.master_port, 31000);
        let w = WorldSpec::from_vars(vars(&with(SLURM, &[(PORT_OVERRIDE, "31001")]))).unwrap();
        assert_eq!(w.master_port, 31001);
        let e = WorldSpec::from_vars(vars(&with(
            TORCHRUN,
            &[
                ("TORCHELASTIC_USE_AGENT_STORE", "1"),
                ("MASTER_PORT", "65535"),
            ],
        )))
        .unwrap_err();
        assert!(e.to_string().contains(PORT_OVERRIDE), "{e}");
        let e = WorldSpec::from_vars(vars(&with(TORCHRUN, &[(PORT_OVERRIDE, "x")]))).unwrap_err();
        assert!(
            matches!(&e, DistError::BadVar { var, .. } if var == PORT_OVERRIDE),
            "{e:?}"
        );
        // A single process ignores it.
        let w = WorldSpec::from_vars(vars(&[(PORT_OVERRIDE, "x")])).unwrap();
        assert_eq!(w, WorldSpec::single());
    }

    #[test]
    fn torchrun_takes_precedence_over_slurm() {
        let mut both = TORCHRUN.to_vec();
        both.extend_from_slice(SLURM);
        let w = WorldSpec::from_vars(vars(&both)).unwrap();
        assert_eq!(w.source, LaunchSource::Torchrun);
        assert_eq!((w.rank, w.world_size), (5, 16));
    }

    #[test]
    fn torchrun_missing_variable_is_named() {
        for var in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ] {
            let e = WorldSpec::from_vars(vars(&without(TORCHRUN, var))).unwrap_err();
            match &e {
                DistError::MissingVar {
                    var: v, launcher, ..
                } => {
                    assert_eq!((v.as_str(), *launcher), (var, "torchrun"))
                }
                other => panic!("{var}: {other:?}"),
            }
            assert!(e.to_string().contains(var), "{e}");
        }
        // An empty value counts as unset.
        let e = WorldSpec::from_vars(vars(&with(TORCHRUN, &[("MASTER_PORT", " ")]))).unwrap_err();
        assert!(matches!(e, DistError::MissingVar { ref var, .. } if var == "MASTER_PORT"));
    }

    #[test]
    fn torchrun_garbage_values_are_named() {
        let cases: &[(&str, &str)] = &[
            ("RANK", "two"),
            ("RANK", "-1"),
            ("RANK", "16"),
            ("WORLD_SIZE", "0"),
            ("LOCAL_RANK", "4"),
            ("LOCAL_WORLD_SIZE", "17"),
            ("LOCAL_WORLD_SIZE", "0"),
            ("MASTER_PORT", "0"),
            ("MASTER_PORT", "70000"),
            ("MASTER_PORT", "http"),
        ];
        for &(var, value) in cases {
            let e = WorldSpec::from_vars(vars(&with(TORCHRUN, &[(var, value)]))).unwrap_err();
            match &e {
                DistError::BadVar { var: v, .. } => assert_eq!(v, var, "{var}={value}: {e}"),
                other => panic!("{var}={value}: {other:?}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(var), "{msg}");
        }
        // The value itself is quoted when it is the culprit.
        let e = WorldSpec::from_vars(vars(&with(TORCHRUN, &[("RANK", "two")]))).unwrap_err();
        assert!(e.to_string().contains("\"two\""), "{e}");
    }

    #[test]
    fn slurm_variables() {
        let w = WorldSpec::from_vars(vars(SLURM)).unwrap();
        assert_eq!(
            w,
            WorldSpec {
                rank: 6,
                world_size: 8,
                local_rank: 2,
                local_world_size: 4,
                master_addr: "gpu003".into(),
                master_port: 15000 + 2117,
                source: LaunchSource::Slurm,
            }
        );
    }

    #[test]
    fn slurm_fallbacks_and_overrides() {
        // No step node list: the job's.
        let w = WorldSpec::from_vars(vars(&without(SLURM, "SLURM_STEP_NODELIST"))).unwrap();
        assert_eq!(w.master_addr, "other1");
        // MASTER_ADDR / MASTER_PORT override.
        let w = WorldSpec::from_vars(vars(&with(
            SLURM,
            &[("MASTER_ADDR", "10.0.0.7"), ("MASTER_PORT", "12345")],
        )))
        .unwrap();
        assert_eq!((w.master_addr.as_str(), w.master_port), ("10.0.0.7", 12345));
        // Tasks per node from SLURM_NTASKS_PER_NODE when the step's list is absent.
        let w = WorldSpec::from_vars(vars(&with(
            &without(SLURM, "SLURM_STEP_TASKS_PER_NODE"),
            &[("SLURM_NTASKS_PER_NODE", "4")],
        )))
        .unwrap();
        assert_eq!(w.local_world_size, 4);
        // Uneven nodes: node 1 of "3,5" has 5 tasks.
        let w = WorldSpec::from_vars(vars(&with(
            SLURM,
            &[("SLURM_STEP_TASKS_PER_NODE", "3,5"), ("SLURM_LOCALID", "4")],
        )))
        .unwrap();
        assert_eq!((w.local_rank, w.local_world_size), (4, 5));
        assert_eq!(slurm_default_port(9999), 24999);
        assert_eq!(slurm_default_port(10000), 15000);
    }

    #[test]
    fn slurm_missing_and_bad_values_are_named() {
        for var in ["SLURM_NTASKS", "SLURM_LOCALID"] {
            let e = WorldSpec::from_vars(vars(&without(SLURM, var))).unwrap_err();
            assert!(
                matches!(&e, DistError::MissingVar { var: v, launcher: "Slurm", .. } if v == var),
                "{e:?}"
            );
        }
        // Neither node list (nor MASTER_ADDR).
        let no_lists = without(&without(SLURM, "SLURM_STEP_NODELIST"), "SLURM_JOB_NODELIST");
        let e = WorldSpec::from_vars(vars(&no_lists)).unwrap_err();
        assert!(matches!(&e, DistError::MissingVar { var, .. } if var == "SLURM_JOB_NODELIST"));
        // No job id for the default port.
        let e = WorldSpec::from_vars(vars(&without(SLURM, "SLURM_JOB_ID"))).unwrap_err();
        assert!(matches!(&e, DistError::MissingVar { var, .. } if var == "SLURM_JOB_ID"));
        // No tasks-per-node at all.
        let e =
            WorldSpec::from_vars(vars(&without(SLURM, "SLURM_STEP_TASKS_PER_NODE"))).unwrap_err();
        assert!(e.to_string().contains("SLURM_STEP_TASKS_PER_NODE"), "{e}");
        let bad: &[(&str, &str)] = &[
            ("SLURM_PROCID", "x"),
            ("SLURM_PROCID", "8"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(xz)"),
            ("SLURM_STEP_TASKS_PER_NODE", "4"), // one node, SLURM_NODEID 1
            ("SLURM_NODEID", "one"),
            ("SLURM_STEP_NODELIST", "gpu[003-004"),
            ("SLURM_JOB_ID", "abc"),
        ];
        for &(var, value) in bad {
            let e = WorldSpec::from_vars(vars(&with(SLURM, &[(var, value)]))).unwrap_err();
            assert!(
                matches!(&e, DistError::BadVar { var: v, value: val, .. } if v == var && val == value),
                "{var}={value}: {e:?}"
            );
        }
    }

    #[test]
    fn hostlists_expand() {
        let ok: &[(&str, &[&str])] = &[
            ("node1", &["node1"]),
            ("a,b,c", &["a", "b", "c"]),
            (
                "gpu[003-005,010],login1",
                &["gpu003", "gpu004", "gpu005", "gpu010", "login1"],
            ),
            ("n[08-11]", &["n08", "n09", "n10", "n11"]),
            ("n[8-11]", &["n8", "n9", "n10", "n11"]),
            ("n[098-101]", &["n098", "n099", "n100", "n101"]),
            (
                "rack[1-2]-gpu[0-1]",
                &["rack1-gpu0", "rack1-gpu1", "rack2-gpu0", "rack2-gpu1"],
            ),
            ("x[1,3]y,z[7]", &["x1y", "x3y", "z7"]),
            ("h[5]-ib", &["h5-ib"]),
        ];
        for (list, want) in ok {
            assert_eq!(expand_hostlist(list).unwrap(), *want, "{list}");
        }
        for bad in [
            "gpu[003-005",
            "gpu003-005]",
            "gpu[5-3]",
            "gpu[a-b]",
            "gpu[]",
            "gpu[1-]",
            "a,,b",
            "",
            "n[1[2]]",
            "n[1-999999999]",
        ] {
            let e = expand_hostlist(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}
