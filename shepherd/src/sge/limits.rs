//! Resource limits from `config` (`setrlimits.c`): Grid Engine value strings (`INFINITY`,
//! `2G`, `512m`, `0:10:0`) turned into the rlimits the guest applies to the job, and the
//! memory limit the VMM itself must stay under.

use guest_agent::protocol::Rlimit;

use super::config::JobConfig;

/// Why a limit value could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid limit {key}={value:?}")]
pub struct LimitError {
    pub key: String,
    pub value: String,
}

/// What a limit counts: time values may be `h:m:s`, the others take memory suffixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Seconds,
    Amount,
}

/// Parses one value; `None` means unlimited.
fn parse_value(s: &str, unit: Unit) -> Option<Option<u64>> {
    let s = s.trim();
    // execd writes UNDEFINED for the execd_params limits nobody set
    if s.eq_ignore_ascii_case("infinity") || s.eq_ignore_ascii_case("undefined") || s.is_empty() {
        return Some(None);
    }
    if unit == Unit::Seconds && s.contains(':') {
        let mut total: u64 = 0;
        for part in s.split(':') {
            let v: u64 = if part.is_empty() {
                0
            } else {
                part.parse().ok()?
            };
            total = total.checked_mul(60)?.checked_add(v)?;
        }
        return Some(Some(total));
    }
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1000f64),
        'K' => (&s[..s.len() - 1], 1024f64),
        'm' => (&s[..s.len() - 1], 1000f64 * 1000.0),
        'M' => (&s[..s.len() - 1], 1024f64 * 1024.0),
        'g' => (&s[..s.len() - 1], 1e9),
        'G' => (&s[..s.len() - 1], 1024f64 * 1024.0 * 1024.0),
        't' => (&s[..s.len() - 1], 1e12),
        'T' => (&s[..s.len() - 1], 1024f64.powi(4)),
        _ => (s, 1f64),
    };
    let v: f64 = num.parse().ok()?;
    if v.is_nan() || v < 0.0 {
        return None;
    }
    let bytes = v * mult;
    Some(Some(if bytes >= u64::MAX as f64 {
        u64::MAX
    } else {
        bytes as u64
    }))
}

/// (config name, resource, unit, multiplied by slots unless `[hs]_<name>_is_consumable_job=1`,
/// always multiplied by slots).
const LIMITS: &[(&str, u32, Unit, bool, bool)] = &[
    ("cpu", libc::RLIMIT_CPU, Unit::Seconds, true, false),
    ("fsize", libc::RLIMIT_FSIZE, Unit::Amount, false, false),
    ("data", libc::RLIMIT_DATA, Unit::Amount, true, false),
    ("stack", libc::RLIMIT_STACK, Unit::Amount, true, false),
    ("core", libc::RLIMIT_CORE, Unit::Amount, false, false),
    ("vmem", libc::RLIMIT_AS, Unit::Amount, true, false),
    ("rss", libc::RLIMIT_RSS, Unit::Amount, false, false),
    (
        "descriptors",
        libc::RLIMIT_NOFILE,
        Unit::Amount,
        false,
        true,
    ),
    ("maxproc", libc::RLIMIT_NPROC, Unit::Amount, false, true),
    (
        "memorylocked",
        libc::RLIMIT_MEMLOCK,
        Unit::Amount,
        false,
        true,
    ),
    ("locks", libc::RLIMIT_LOCKS, Unit::Amount, false, true),
];

fn read(config: &JobConfig, key: String, unit: Unit) -> Result<Option<u64>, LimitError> {
    match config.get(&key) {
        None => Ok(None),
        Some(v) => parse_value(v, unit).ok_or(LimitError {
            key,
            value: v.to_string(),
        }),
    }
}

fn slots(config: &JobConfig) -> u64 {
    config
        .get("host_slots")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// The job's rlimits (only the ones that are set; unlimited = `u64::MAX`). A soft limit above
/// the hard one is lowered to it, as `setrlimit` would refuse it otherwise.
pub fn job_rlimits(config: &JobConfig) -> Result<Vec<Rlimit>, LimitError> {
    let slots = slots(config);
    let mut out = Vec::new();
    for &(name, resource, unit, per_slot, always_per_slot) in LIMITS {
        let soft = read(config, format!("s_{name}"), unit)?;
        let hard = read(config, format!("h_{name}"), unit)?;
        if config.get(&format!("s_{name}")).is_none() && config.get(&format!("h_{name}")).is_none()
        {
            continue;
        }
        let factor = |prefix: &str| {
            let consumable = config.flag(&format!("{prefix}_{name}_is_consumable_job"));
            if always_per_slot || (per_slot && !consumable) {
                slots
            } else {
                1
            }
        };
        let scale = |v: Option<u64>, f: u64| v.map_or(u64::MAX, |v| v.saturating_mul(f));
        let hard = scale(hard, factor("h"));
        let soft = scale(soft, factor("s")).min(hard);
        if soft == u64::MAX && hard == u64::MAX {
            continue;
        }
        out.push(Rlimit {
            resource,
            soft,
            hard,
        });
    }
    Ok(out)
}

/// The job's `h_vmem` over all its slots here, in bytes; `None` when unlimited. Execd's PDC
/// kills the job when its processes (the VMM) use more.
pub fn vmem_budget(config: &JobConfig) -> Result<Option<u64>, LimitError> {
    vmem_over_slots(config, "h")
}

/// The job's `s_vmem` over all its slots here, in bytes, as [`vmem_budget`] counts `h_vmem`.
pub fn soft_vmem_budget(config: &JobConfig) -> Result<Option<u64>, LimitError> {
    vmem_over_slots(config, "s")
}

fn vmem_over_slots(config: &JobConfig, prefix: &str) -> Result<Option<u64>, LimitError> {
    let value = read(config, format!("{prefix}_vmem"), Unit::Amount)?;
    let factor = if config.flag(&format!("{prefix}_vmem_is_consumable_job")) {
        1
    } else {
        slots(config)
    };
    Ok(value.map(|v| v.saturating_mul(factor)))
}

/// A memory amount as Grid Engine writes it (`4G`, `512m`, `1.5K`); `None` when unlimited or
/// not an amount.
pub fn parse_amount(value: &str) -> Option<u64> {
    parse_value(value, Unit::Amount).flatten()
}

/// The job's slots on this host (`host_slots`, at least 1).
pub fn host_slots(config: &JobConfig) -> u64 {
    slots(config)
}

/// The job's nice value (`priority`).
pub fn nice(config: &JobConfig) -> i32 {
    config
        .get("priority")
        .and_then(|v| v.trim().parse::<i32>().ok())
        .unwrap_or(0)
        .clamp(-20, 19)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        assert_eq!(parse_value("INFINITY", Unit::Amount), Some(None));
        assert_eq!(parse_value("UNDEFINED", Unit::Amount), Some(None));
        assert_eq!(parse_value("2G", Unit::Amount), Some(Some(2 << 30)));
        assert_eq!(parse_value("2g", Unit::Amount), Some(Some(2_000_000_000)));
        assert_eq!(parse_value("512M", Unit::Amount), Some(Some(512 << 20)));
        assert_eq!(parse_value("1.5K", Unit::Amount), Some(Some(1536)));
        assert_eq!(parse_value("0:10:0", Unit::Seconds), Some(Some(600)));
        assert_eq!(parse_value("1:0:0", Unit::Seconds), Some(Some(3600)));
        assert_eq!(parse_value("90", Unit::Seconds), Some(Some(90)));
        assert_eq!(parse_value("lots", Unit::Amount), None);
        assert_eq!(parse_value("-1", Unit::Amount), None);
    }

    #[test]
    fn rlimits_scale_with_slots_unless_consumable() {
        let c = JobConfig::parse(
            "host_slots=2\ns_cpu=0:1:0\nh_cpu=0:2:0\nh_cpu_is_consumable_job=0\n\
             h_vmem=1G\ns_vmem=INFINITY\nh_vmem_is_consumable_job=1\nh_fsize=1M\ns_fsize=2M\n\
             h_stack=INFINITY\ns_stack=INFINITY\nh_descriptors=100\ns_descriptors=100\n",
        );
        let l = job_rlimits(&c).unwrap();
        let get = |r: i32| l.iter().find(|x| x.resource == r as u32).copied();
        let cpu = get(libc::RLIMIT_CPU as i32).unwrap();
        assert_eq!((cpu.soft, cpu.hard), (120, 240));
        let vmem = get(libc::RLIMIT_AS as i32).unwrap();
        assert_eq!((vmem.soft, vmem.hard), (1 << 30, 1 << 30));
        let fsize = get(libc::RLIMIT_FSIZE as i32).unwrap();
        assert_eq!((fsize.soft, fsize.hard), (1 << 20, 1 << 20));
        assert!(get(libc::RLIMIT_STACK as i32).is_none());
        let nofile = get(libc::RLIMIT_NOFILE as i32).unwrap();
        assert_eq!((nofile.soft, nofile.hard), (200, 200));
        assert_eq!(vmem_budget(&c).unwrap(), Some(1 << 30));
    }

    #[test]
    fn bad_value_is_an_error_and_nice_is_clamped() {
        let c = JobConfig::parse("h_vmem=huge\npriority=-50\n");
        assert!(job_rlimits(&c).is_err());
        assert_eq!(nice(&c), -20);
        assert_eq!(
            vmem_budget(&JobConfig::parse("h_vmem=INFINITY\n")).unwrap(),
            None
        );
    }
}
