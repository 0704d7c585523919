//! The donor's availability rules: when this machine takes work at all.
//!
//! Two rules, both optional, both from `agent.toml`:
//! - `schedule`: windows of the week in the donor's time zone (`timezone`,
//!   else the system's), e.g. `["Mon-Fri 22:00-07:00", "Sat-Sun"]`. An entry
//!   is days (a day, a range `Mon-Fri`, or a list `Mon,Wed,Fri-Sat`; none:
//!   every day) and optionally a time range. The days name the day a window
//!   *starts*: `Mon-Fri 22:00-07:00` runs from Monday 22:00 to Tuesday 07:00
//!   and so on, the last from Friday 22:00 to Saturday 07:00. Outside every
//!   window the agent takes no new job.
//! - `only_when_idle`: the machine's 1-minute load average (less one per job
//!   of the agent's own running) must stay under `idle_load` per core, and
//!   no terminal (`/dev/pts/*`, `/dev/tty<n>`: typing in a terminal or an ssh
//!   session, as `w` shows it) may have been used for `idle_for`. Where no
//!   terminal exists (a desktop session's idle time is not seen), only the
//!   load counts.
//!
//! [`Limits::check`] is pure: the time and the machine's readings come in as
//! arguments, so tests inject them. [`Gate`] is what the session holds: the
//! rules, the sensors that read this machine, the current answer and when to
//! look again. A limit only stops *new* work: running jobs finish.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use trunkfarm_proto::settings::fmt_duration;

use trunkfarm_proto::v1::{Capabilities, Paused};

use crate::config::AgentConfig;
use crate::donor::say;

/// Day names as the donor writes them, Monday first.
const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// The longest the gate sleeps between two looks, even with only a
/// schedule: a suspended laptop or a clock set by hand is noticed soon.
const MAX_RECHECK: Duration = Duration::from_secs(10 * 60);

/// Where the load average is read by default.
pub(crate) const LOADAVG: &str = "/proc/loadavg";

/// A schedule entry the donor wrote that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule entry `{entry}`: {problem}")]
pub(crate) struct ScheduleError {
    entry: String,
    problem: String,
}

/// One window of the week.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Window {
    /// The days it starts on, Monday first.
    days: [bool; 7],
    /// Minutes after midnight it starts and ends (`end` up to 1440; an end
    /// at or before the start is the next day's); `None`: the whole day.
    span: Option<(u16, u16)>,
}

impl Window {
    /// Parses one entry: `[days] [HH:MM-HH:MM]`, at least one of the two.
    fn parse(entry: &str) -> Result<Window, ScheduleError> {
        let fail = |problem: String| ScheduleError {
            entry: entry.to_owned(),
            problem,
        };
        let words: Vec<&str> = entry.split_whitespace().collect();
        let (days, time) = match words.as_slice() {
            [] => {
                return Err(fail(
                    "is empty; write e.g. \"Mon-Fri 22:00-07:00\" or \"Sat-Sun\"".into(),
                ));
            }
            [one] if one.contains(':') => (None, Some(*one)),
            [one] => (Some(*one), None),
            [days, time] => (Some(*days), Some(*time)),
            _ => {
                return Err(fail(
                    "expected days and a time range, e.g. \"Mon-Fri 22:00-07:00\" (lists without spaces: \"Mon,Wed\")"
                        .into(),
                ));
            }
        };
        let days = match days {
            None => [true; 7],
            Some(text) => parse_days(text).map_err(fail)?,
        };
        let span = match time {
            None => None,
            Some(text) => Some(parse_span(text).map_err(fail)?),
        };
        Ok(Window { days, span })
    }

    /// Whether local day `day` (0 = Monday) at `minute` after midnight is in it.
    fn contains(&self, day: usize, minute: u16) -> bool {
        let yesterday = (day + 6) % 7;
        match self.span {
            None => self.days[day],
            Some((start, end)) if start < end => self.days[day] && start <= minute && minute < end,
            // Crossing midnight: this day's evening or the morning after a start day.
            Some((start, end)) => {
                (self.days[day] && minute >= start) || (self.days[yesterday] && minute < end)
            }
        }
    }

    /// The minutes after midnight where its answer may change.
    fn edges(&self) -> Vec<u16> {
        match self.span {
            None => vec![0],
            Some((start, end)) => vec![0, start, end % 1440],
        }
    }
}

/// `Mon`, `Mon-Fri`, `Fri-Mon` (wrapping), `Mon,Wed,Fri-Sun`.
fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (day_index(a)?, day_index(b)?),
            None => {
                let d = day_index(part)?;
                (d, d)
            }
        };
        let mut d = first;
        loop {
            days[d] = true;
            if d == last {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(days)
}

/// A day's index (0 = Monday) from its three-letter or full English name,
/// in any case.
fn day_index(name: &str) -> Result<usize, String> {
    let lower = name.trim().to_ascii_lowercase();
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    (0..7)
        .find(|&i| lower == DAYS[i].to_ascii_lowercase() || lower == FULL[i])
        .ok_or_else(|| {
            if name.trim().is_empty() {
                "a day is missing around `-` or `,`; use Mon Tue Wed Thu Fri Sat Sun".to_owned()
            } else {
                format!("unknown day `{name}`, use Mon Tue Wed Thu Fri Sat Sun")
            }
        })
}

/// `HH:MM-HH:MM` (24-hour clock; `24:00` as an end).
fn parse_span(text: &str) -> Result<(u16, u16), String> {
    let Some((a, b)) = text.split_once('-') else {
        return Err(format!(
            "`{text}` is not a time range; write it as HH:MM-HH:MM, e.g. 22:00-07:00"
        ));
    };
    let start = parse_clock(a, false)?;
    let end = parse_clock(b, true)?;
    if start == end % 1440 {
        return Err(format!(
            "`{text}` starts and ends at the same time; leave the times out for whole days"
        ));
    }
    Ok((start, end))
}

/// `HH:MM` as minutes after midnight.
fn parse_clock(text: &str, end: bool) -> Result<u16, String> {
    let bad =
        || format!("`{text}` is not a time of day; write HH:MM on a 24-hour clock, e.g. 07:30");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u16 = h.parse().map_err(|_| bad())?;
    let m: u16 = m.parse().map_err(|_| bad())?;
    match (h, m) {
        (24, 0) if end => Ok(1440),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

/// The donor's weekly windows in a time zone; empty: any time.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    windows: Vec<Window>,
    /// The entries as written, for people.
    entries: Vec<String>,
    tz: TimeZone,
}

impl Schedule {
    /// Parses the entries, evaluated in `tz`.
    pub fn parse(entries: &[String], tz: TimeZone) -> Result<Schedule, ScheduleError> {
        let windows = entries
            .iter()
            .map(|e| Window::parse(e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Schedule {
            windows,
            entries: entries
                .iter()
                .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect(),
            tz,
        })
    }

    /// No window: any time.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether `at` falls in a window.
    pub fn open_at(&self, at: Timestamp) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let z = at.to_zoned(self.tz.clone());
        let day = usize::try_from(z.weekday().to_monday_zero_offset()).unwrap_or(0);
        let minute = u16::try_from(i32::from(z.hour()) * 60 + i32::from(z.minute())).unwrap_or(0);
        self.windows.iter().any(|w| w.contains(day, minute))
    }

    /// The first moment after `now` where [`Schedule::open_at`] changes,
    /// within the next eight days (`None`: it never changes, e.g. every
    /// day whole). Found among the windows' edges in local time, each
    /// turned into an instant in the zone (a time a DST change skips is
    /// taken as the zone does: the moment after the gap).
    pub fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        if self.windows.is_empty() {
            return None;
        }
        let open = self.open_at(now);
        let today: Date = now.to_zoned(self.tz.clone()).date();
        let mut edges: Vec<u16> = self.windows.iter().flat_map(Window::edges).collect();
        edges.sort_unstable();
        edges.dedup();
        let mut candidates: Vec<Timestamp> = Vec::new();
        for offset in 0..=8i64 {
            let Ok(date) = today.checked_add(jiff::Span::new().days(offset)) else {
                continue;
            };
            for &minute in &edges {
                let time = jiff::civil::time(
                    i8::try_from(minute / 60).unwrap_or(0),
                    i8::try_from(minute % 60).unwrap_or(0),
                    0,
                    0,
                );
                if let Ok(z) = date.to_datetime(time).to_zoned(self.tz.clone()) {
                    let t = z.timestamp();
                    if t > now {
                        candidates.push(t);
                    }
                }
            }
        }
        candidates.sort_unstable();
        candidates.into_iter().find(|&t| self.open_at(t) != open)
    }

    /// "Mon-Fri 22:00-07:00, Sat-Sun".
    pub fn text(&self) -> String {
        self.entries.join(", ")
    }

    /// The zone's name for people: "Europe/Berlin", else "the donor's local".
    pub fn zone_name(&self) -> String {
        zone_name(&self.tz)
    }

    /// `at` in the schedule's zone, as the donor reads it: "Mon 22:00".
    pub fn local(&self, at: Timestamp) -> String {
        let z: Zoned = at.to_zoned(self.tz.clone());
        format!(
            "{} {:02}:{:02}",
            DAYS[usize::try_from(z.weekday().to_monday_zero_offset()).unwrap_or(0)],
            z.hour(),
            z.minute()
        )
    }
}

/// A zone's name for people.
fn zone_name(tz: &TimeZone) -> String {
    tz.iana_name()
        .map(str::to_owned)
        .unwrap_or_else(|| "local".to_owned())
}

/// The time zone a `timezone` setting names (`None`: the system's).
pub(crate) fn time_zone(name: Option<&str>) -> Result<TimeZone, String> {
    match name {
        None => Ok(TimeZone::system()),
        Some(name) => TimeZone::get(name).map_err(|e| {
            format!("unknown time zone {name:?} ({e}); use an IANA name such as \"Europe/Berlin\" or \"UTC\"")
        }),
    }
}

/// `only_when_idle`'s thresholds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IdleRule {
    /// The highest 1-minute load average per core that counts as idle.
    pub load_per_core: f64,
    /// The machine's cores (the load average is the whole machine's).
    pub cores: u32,
    /// How long no terminal must have been used; zero: terminals not looked at.
    pub idle_for: Duration,
}

impl IdleRule {
    /// The load at which the machine stops being idle.
    fn threshold(&self) -> f64 {
        self.load_per_core * f64::from(self.cores.max(1))
    }

    /// "load under 1.0 and no terminal used for 10m".
    pub fn text(&self) -> String {
        let mut text = format!("load under {:.1}", self.threshold());
        if !self.idle_for.is_zero() {
            text.push_str(&format!(
                " and no terminal used for {}",
                fmt_duration(self.idle_for)
            ));
        }
        text
    }
}

/// What this machine says now (read by [`Sensors`], or given by a test).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Readings {
    /// The 1-minute load average, or why it could not be read.
    pub load1: Result<f64, String>,
    /// Since the newest terminal input; `None`: no terminal to look at.
    pub user_idle: Option<Duration>,
    /// Jobs of this agent's running now (their load is not the donor's).
    pub running_jobs: usize,
}

/// Why the agent takes no new job now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unavailable {
    /// Which rule: outside the schedule (`true`) or not idle (`false`).
    pub scheduled_off: bool,
    /// In words after the agent's name: "outside its donor's schedule (…)",
    /// "waiting for the machine to be idle (…)".
    pub reason: String,
    /// When it ends by itself (the schedule's next window), if known.
    pub until: Option<Timestamp>,
    /// `until` in the donor's zone ("Mon 22:00"), for the donor.
    pub until_local: Option<String>,
}

impl Unavailable {
    /// For the donor: the reason and, when known, until when in local time.
    pub fn describe(&self) -> String {
        match &self.until_local {
            Some(at) => format!("{} until {at}", self.reason),
            None => self.reason.clone(),
        }
    }

    /// What the hub is told: paused, with the reason and its end.
    pub fn paused(&self) -> Paused {
        Paused {
            paused: true,
            reason: self.reason.clone(),
            until_ms: self.until_ms(),
        }
    }

    /// Unix ms it ends by itself; 0 when not known.
    pub fn until_ms(&self) -> u64 {
        self.until
            .map_or(0, |t| u64::try_from(t.as_millisecond()).unwrap_or(0))
    }
}

/// The donor's availability rules.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub schedule: Schedule,
    pub idle: Option<IdleRule>,
    /// How often the idle rule is looked at.
    pub idle_check: Duration,
}

impl Limits {
    /// The rules of `config` on a machine with `cores` cores.
    pub fn from_config(config: &AgentConfig, cores: u32) -> Result<Limits, String> {
        let tz = time_zone(config.timezone.as_deref())?;
        let schedule = Schedule::parse(&config.schedule, tz).map_err(|e| e.to_string())?;
        Ok(Limits {
            schedule,
            idle: config.only_when_idle.then_some(IdleRule {
                load_per_core: config.idle_load,
                cores,
                idle_for: config.idle_for,
            }),
            idle_check: config.idle_check,
        })
    }

    /// Whether there is any rule to check.
    pub fn any(&self) -> bool {
        !self.schedule.is_empty() || self.idle.is_some()
    }

    /// Why no new job may start at `now` given `readings`; `None`: it may.
    /// The schedule first (it says until when), then idleness.
    pub fn check(&self, now: Timestamp, readings: &Readings) -> Option<Unavailable> {
        if !self.schedule.open_at(now) {
            let until = self.schedule.next_change(now);
            return Some(Unavailable {
                scheduled_off: true,
                reason: format!(
                    "outside its donor's schedule ({}, {} time)",
                    self.schedule.text(),
                    self.schedule.zone_name()
                ),
                until,
                until_local: until.map(|t| self.schedule.local(t)),
            });
        }
        let rule = self.idle.as_ref()?;
        let busy = |why: String| {
            Some(Unavailable {
                scheduled_off: false,
                reason: format!("waiting for the machine to be idle ({why})"),
                until: None,
                until_local: None,
            })
        };
        match &readings.load1 {
            Err(e) => return busy(format!("cannot read its load: {e}")),
            Ok(load) => {
                // The agent's own jobs are not the donor's use of the machine.
                let others = (load - readings.running_jobs as f64).max(0.0);
                if others > rule.threshold() {
                    return busy(format!("load {others:.1} > {:.1}", rule.threshold()));
                }
            }
        }
        if !rule.idle_for.is_zero()
            && let Some(idle) = readings.user_idle
            && idle < rule.idle_for
        {
            return busy(format!(
                "a terminal was used {} ago, it waits for {}",
                fmt_duration(Duration::from_secs(idle.as_secs())),
                fmt_duration(rule.idle_for)
            ));
        }
        None
    }

    /// How long until the answer may change: the idle rule's period, the
    /// schedule's next edge, at most [`MAX_RECHECK`]; `None`: never (no rule).
    pub fn recheck(&self, now: Timestamp) -> Option<Duration> {
        if !self.any() {
            return None;
        }
        let mut wait = MAX_RECHECK;
        if self.idle.is_some() {
            wait = wait.min(self.idle_check);
        }
        if let Some(edge) = self.schedule.next_change(now) {
            let ms = edge.as_millisecond().saturating_sub(now.as_millisecond());
            // A little past the edge, so the look lands inside the new state.
            let to_edge = Duration::from_millis(u64::try_from(ms).unwrap_or(0) + 500);
            wait = wait.min(to_edge);
        }
        Some(wait)
    }

    /// The schedule as the operator reads it ("Mon-Fri 22:00-07:00, Sat-Sun
    /// (Europe/Berlin)"); empty: any time.
    pub fn schedule_words(&self) -> String {
        if self.schedule.is_empty() {
            String::new()
        } else {
            format!("{} ({})", self.schedule.text(), self.schedule.zone_name())
        }
    }

    /// `only_when_idle` as the operator reads it; empty: not set.
    pub fn idle_words(&self) -> String {
        self.idle.as_ref().map(IdleRule::text).unwrap_or_default()
    }
}

/// Reads this machine: the load average (from [`LOADAVG`], or the file a
/// test names) and the terminals' last input.
#[derive(Debug, Clone)]
pub(crate) struct Sensors {
    /// The `loadavg`-format file read.
    pub loadavg: PathBuf,
    /// Whether terminals are looked at.
    pub terminals: bool,
}

impl Sensors {
    /// What the machine says now.
    pub fn read(&self, running_jobs: usize) -> Readings {
        Readings {
            load1: read_load(&self.loadavg),
            user_idle: if self.terminals {
                terminal_idle(Timestamp::now())
            } else {
                None
            },
            running_jobs,
        }
    }
}

/// The first field of a `loadavg` file.
fn read_load(path: &Path) -> Result<f64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_load(&text).ok_or_else(|| format!("{}: no load average in {text:?}", path.display()))
}

/// `0.52 0.58 0.59 1/467 12345` → 0.52.
fn parse_load(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|l| l.is_finite() && *l >= 0.0)
}

/// Since the newest input on a terminal (the access time of `/dev/pts/<n>`
/// and `/dev/tty<n>`, as `w` reads it); `None` when there is none.
fn terminal_idle(now: Timestamp) -> Option<Duration> {
    idle_since(
        &[(Path::new("/dev/pts"), ""), (Path::new("/dev"), "tty")],
        now,
    )
}

/// Since the newest access time of the files in `dirs` named their prefix
/// and a number (`3`, `tty4`; not `ptmx`, `tty`, `ttyS0`).
fn idle_since(dirs: &[(&Path, &str)], now: Timestamp) -> Option<Duration> {
    let mut newest: Option<std::time::SystemTime> = None;
    for &(dir, prefix) in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
                continue;
            };
            if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Ok(at) = entry.metadata().and_then(|m| m.accessed()) {
                newest = Some(newest.map_or(at, |n| n.max(at)));
            }
        }
    }
    let newest = Timestamp::try_from(newest?).ok()?;
    let ms = now.as_millisecond().saturating_sub(newest.as_millisecond());
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// The gate of `run`: the rules of `config` on a machine of `machine_cores`,
/// written into `caps` for the operator (`schedule`, `only_when_idle`), and
/// said to the donor once at the start.
pub(crate) fn start(
    config: &AgentConfig,
    machine_cores: u32,
    caps: &mut Capabilities,
) -> Result<Gate, String> {
    let limits = Limits::from_config(config, machine_cores)?;
    caps.schedule = limits.schedule_words();
    caps.only_when_idle = limits.idle_words();
    let sensors = Sensors {
        loadavg: config
            .loadavg_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(LOADAVG)),
        terminals: !config.idle_for.is_zero(),
    };
    if !caps.schedule.is_empty() {
        say(&format!("This agent takes work only {}.", caps.schedule));
    }
    if !caps.only_when_idle.is_empty() {
        say(&format!(
            "This agent takes work only while the machine is idle ({}).",
            caps.only_when_idle
        ));
    }
    let gate = Gate::new(limits, sensors, 0);
    if let Some(u) = gate.unavailable() {
        say(&format!("It takes no job now: {}.", u.describe()));
    }
    Ok(gate)
}

/// What the session holds: the rules, this machine's sensors, the current
/// answer and when to look again.
#[derive(Debug)]
pub(crate) struct Gate {
    limits: Limits,
    sensors: Sensors,
    state: Option<Unavailable>,
    next: Option<tokio::time::Instant>,
}

impl Gate {
    /// A gate that has looked once.
    pub fn new(limits: Limits, sensors: Sensors, running_jobs: usize) -> Gate {
        let mut gate = Gate {
            limits,
            sensors,
            state: None,
            next: None,
        };
        gate.check(running_jobs);
        gate
    }

    /// When to call [`Gate::check`] again (`None`: no rule, never).
    pub fn due(&self) -> Option<tokio::time::Instant> {
        self.next
    }

    /// Looks again; true when the answer changed.
    pub fn check(&mut self, running_jobs: usize) -> bool {
        let now = Timestamp::now();
        let next = if self.limits.any() {
            let readings = if self.limits.idle.is_some() {
                self.sensors.read(running_jobs)
            } else {
                Readings {
                    load1: Ok(0.0),
                    user_idle: None,
                    running_jobs,
                }
            };
            self.limits.check(now, &readings)
        } else {
            None
        };
        self.next = self
            .limits
            .recheck(now)
            .map(|d| tokio::time::Instant::now() + d);
        // Only the rule and its end count as a change: the live figures in
        // the words (the load, a terminal's idle time) change at every look
        // and would re-announce it to the donor and every hub each time.
        let rule = |u: &Option<Unavailable>| u.as_ref().map(|u| (u.scheduled_off, u.until));
        let changed = rule(&next) != rule(&self.state);
        self.state = next;
        changed
    }

    /// Why no new job may start now; `None`: it may.
    pub fn unavailable(&self) -> Option<&Unavailable> {
        self.state.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn schedule(entries: &[&str], zone: &str) -> Schedule {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        Schedule::parse(&entries, TimeZone::get(zone).unwrap()).unwrap()
    }

    fn idle() -> Readings {
        Readings {
            load1: Ok(0.1),
            user_idle: None,
            running_jobs: 0,
        }
    }

    fn limits(entries: &[&str], zone: &str) -> Limits {
        Limits {
            schedule: schedule(entries, zone),
            idle: None,
            idle_check: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_night_window_crosses_midnight_from_its_start_days() {
        // 2026-12-07 is a Monday.
        let s = schedule(&["Mon-Fri 22:00-07:00", "Sat-Sun"], "UTC");
        assert!(!s.open_at(utc("2026-12-07T12:00:00Z")), "Monday noon");
        assert!(s.open_at(utc("2026-12-07T22:00:00Z")), "Monday 22:00");
        assert!(s.open_at(utc("2026-12-08T06:59:00Z")), "Tuesday 06:59");
        assert!(!s.open_at(utc("2026-12-08T07:00:00Z")), "Tuesday 07:00");
        assert!(s.open_at(utc("2026-12-12T05:00:00Z")), "Saturday morning");
        assert!(s.open_at(utc("2026-12-13T23:00:00Z")), "Sunday late");
        // Monday 03:00 follows a Sunday (whole day, no night window): closed.
        assert!(!s.open_at(utc("2026-12-14T03:00:00Z")), "Monday 03:00");
        // Friday night runs into Saturday morning.
        assert!(s.open_at(utc("2026-12-11T23:30:00Z")), "Friday night");

        // The next window from Monday noon is Monday 22:00.
        let now = utc("2026-12-07T12:00:00Z");
        assert_eq!(s.next_change(now), Some(utc("2026-12-07T22:00:00Z")));
        assert_eq!(s.local(utc("2026-12-07T22:00:00Z")), "Mon 22:00");
        // From Friday night the machine stays open through the weekend,
        // until Monday 00:00 ends Sunday.
        assert_eq!(
            s.next_change(utc("2026-12-11T23:00:00Z")),
            Some(utc("2026-12-14T00:00:00Z"))
        );
    }

    #[test]
    fn day_lists_ranges_and_time_only_entries() {
        let s = schedule(&["Mon,Wed,Fri-Sat 09:00-17:30"], "UTC");
        assert!(s.open_at(utc("2026-12-09T09:00:00Z")), "Wednesday 09:00");
        assert!(!s.open_at(utc("2026-12-08T10:00:00Z")), "Tuesday");
        assert!(s.open_at(utc("2026-12-12T17:29:00Z")), "Saturday 17:29");
        assert!(!s.open_at(utc("2026-12-12T17:30:00Z")), "Saturday 17:30");
        assert!(!s.open_at(utc("2026-12-13T10:00:00Z")), "Sunday");
        // A wrapping range and full names, any case.
        let s = schedule(&["friday-MON"], "UTC");
        assert!(s.open_at(utc("2026-12-14T10:00:00Z")), "Monday");
        assert!(!s.open_at(utc("2026-12-15T10:00:00Z")), "Tuesday");
        // Times alone: every day.
        let s = schedule(&["12:00-13:00"], "UTC");
        assert!(s.open_at(utc("2026-12-10T12:30:00Z")));
        assert!(!s.open_at(utc("2026-12-10T13:00:00Z")));
        // Up to midnight.
        let s = schedule(&["Sun 18:00-24:00"], "UTC");
        assert!(s.open_at(utc("2026-12-13T23:59:00Z")));
        assert!(!s.open_at(utc("2026-12-14T00:00:00Z")));
        // Whole days every day never change.
        assert_eq!(
            schedule(&["Mon-Sun"], "UTC").next_change(utc("2026-12-10T12:30:00Z")),
            None
        );
        // No schedule: always open.
        let none = Schedule::parse(&[], TimeZone::UTC).unwrap();
        assert!(none.open_at(utc("2026-12-10T12:30:00Z")));
        assert_eq!(none.next_change(utc("2026-12-10T12:30:00Z")), None);
    }

    #[test]
    fn local_time_is_the_donors_zone_across_a_dst_change() {
        // Berlin: CET (UTC+1) until 2027-03-28 02:00, then CEST (UTC+2).
        let s = schedule(&["Mon-Fri 22:00-07:00"], "Europe/Berlin");
        // Friday 2027-03-26 22:00 CET = 21:00 UTC.
        assert!(!s.open_at(utc("2027-03-26T20:59:00Z")));
        assert!(s.open_at(utc("2027-03-26T21:00:00Z")));
        // Monday 2027-03-29 22:00 CEST = 20:00 UTC: the same local hour.
        assert!(!s.open_at(utc("2027-03-29T19:59:00Z")));
        assert!(s.open_at(utc("2027-03-29T20:00:00Z")));
        // Tuesday 07:00 CEST = 05:00 UTC.
        assert!(s.open_at(utc("2027-03-30T04:59:00Z")));
        assert!(!s.open_at(utc("2027-03-30T05:00:00Z")));
        // From Saturday noon the next window is Monday 22:00 local, over the change.
        assert_eq!(
            s.next_change(utc("2027-03-27T12:00:00Z")),
            Some(utc("2027-03-29T20:00:00Z"))
        );
        assert_eq!(s.local(utc("2027-03-29T20:00:00Z")), "Mon 22:00");
        assert_eq!(s.zone_name(), "Europe/Berlin");
    }

    #[test]
    fn outside_the_schedule_says_why_and_until_when() {
        let l = limits(&["Mon-Fri 22:00-07:00", "Sat-Sun"], "UTC");
        let now = utc("2026-12-07T12:00:00Z");
        let u = l.check(now, &idle()).unwrap();
        assert_eq!(
            u.reason,
            "outside its donor's schedule (Mon-Fri 22:00-07:00, Sat-Sun, UTC time)"
        );
        assert_eq!(u.until, Some(utc("2026-12-07T22:00:00Z")));
        assert_eq!(
            u.describe(),
            "outside its donor's schedule (Mon-Fri 22:00-07:00, Sat-Sun, UTC time) until Mon 22:00"
        );
        assert_eq!(u.until_ms(), 1_796_680_800_000);
        // Inside: available; rechecked at the window's end at the latest.
        let inside = utc("2026-12-08T06:55:00Z");
        assert_eq!(l.check(inside, &idle()), None);
        assert_eq!(l.recheck(inside), Some(Duration::from_millis(300_500)));
        // Outside, far from the edge: looked at again within MAX_RECHECK.
        assert_eq!(l.recheck(now), Some(MAX_RECHECK));
        assert_eq!(l.schedule_words(), "Mon-Fri 22:00-07:00, Sat-Sun (UTC)");
    }

    #[test]
    fn only_when_idle_reads_the_load_and_the_terminals() {
        let l = Limits {
            schedule: Schedule::parse(&[], TimeZone::UTC).unwrap(),
            idle: Some(IdleRule {
                load_per_core: 0.5,
                cores: 2,
                idle_for: Duration::from_secs(600),
            }),
            idle_check: Duration::from_secs(30),
        };
        let now = utc("2026-12-07T12:00:00Z");
        let busy = Readings {
            load1: Ok(3.2),
            user_idle: None,
            running_jobs: 0,
        };
        assert_eq!(
            l.check(now, &busy).unwrap().describe(),
            "waiting for the machine to be idle (load 3.2 > 1.0)"
        );
        assert_eq!(l.check(now, &busy).unwrap().until_ms(), 0);
        // Two of the agent's own jobs running: 1.2 of the load is someone else's.
        let ours = Readings {
            running_jobs: 2,
            ..busy.clone()
        };
        assert_eq!(
            l.check(now, &ours).unwrap().reason,
            "waiting for the machine to be idle (load 1.2 > 1.0)"
        );
        let quiet = Readings {
            load1: Ok(0.9),
            user_idle: Some(Duration::from_secs(3600)),
            running_jobs: 0,
        };
        assert_eq!(l.check(now, &quiet), None);
        let typing = Readings {
            user_idle: Some(Duration::from_secs(125)),
            ..quiet.clone()
        };
        assert_eq!(
            l.check(now, &typing).unwrap().reason,
            "waiting for the machine to be idle (a terminal was used 2m 5s ago, it waits for 10m)"
        );
        let unreadable = Readings {
            load1: Err("/proc/loadavg: gone".into()),
            ..quiet
        };
        assert_eq!(
            l.check(now, &unreadable).unwrap().reason,
            "waiting for the machine to be idle (cannot read its load: /proc/loadavg: gone)"
        );
        assert_eq!(l.recheck(now), Some(Duration::from_secs(30)));
        assert_eq!(
            l.idle_words(),
            "load under 1.0 and no terminal used for 10m"
        );
    }

    #[test]
    fn the_schedule_comes_before_idleness() {
        let mut l = limits(&["Sat-Sun"], "UTC");
        l.idle = Some(IdleRule {
            load_per_core: 0.5,
            cores: 1,
            idle_for: Duration::ZERO,
        });
        let busy = Readings {
            load1: Ok(9.0),
            user_idle: Some(Duration::ZERO),
            running_jobs: 0,
        };
        let u = l.check(utc("2026-12-07T12:00:00Z"), &busy).unwrap();
        assert!(
            u.reason.starts_with("outside its donor's schedule"),
            "{u:?}"
        );
        // In the window: the load decides; terminals are not looked at (idle_for 0).
        let u = l.check(utc("2026-12-12T12:00:00Z"), &busy).unwrap();
        assert_eq!(
            u.reason,
            "waiting for the machine to be idle (load 9.0 > 0.5)"
        );
        let calm = Readings {
            load1: Ok(0.2),
            ..busy
        };
        assert_eq!(l.check(utc("2026-12-12T12:00:00Z"), &calm), None);
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let err = |e: &str| {
            Schedule::parse(&[e.to_owned()], TimeZone::UTC)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("Mon-Fry 22:00"),
            "schedule entry `Mon-Fry 22:00`: unknown day `Fry`, use Mon Tue Wed Thu Fri Sat Sun"
        );
        assert_eq!(
            err("Mon-Fri 22:00"),
            "schedule entry `Mon-Fri 22:00`: `22:00` is not a time range; write it as HH:MM-HH:MM, e.g. 22:00-07:00"
        );
        assert_eq!(
            err("Mon 25:00-07:00"),
            "schedule entry `Mon 25:00-07:00`: `25:00` is not a time of day; write HH:MM on a 24-hour clock, e.g. 07:30"
        );
        assert_eq!(
            err("Mon 7-9"),
            "schedule entry `Mon 7-9`: `7` is not a time of day; write HH:MM on a 24-hour clock, e.g. 07:30"
        );
        assert_eq!(
            err("Mon 09:00-09:00"),
            "schedule entry `Mon 09:00-09:00`: `09:00-09:00` starts and ends at the same time; leave the times out for whole days"
        );
        assert_eq!(
            err("  "),
            "schedule entry `  `: is empty; write e.g. \"Mon-Fri 22:00-07:00\" or \"Sat-Sun\""
        );
        assert!(err("Mon - Fri").contains("expected days and a time range"));
        assert!(err("Mon,,Fri").contains("a day is missing"));
        assert!(err("Mon 24:00-07:00").contains("`24:00` is not a time of day"));
        assert!(
            time_zone(Some("Mars/Olympus"))
                .unwrap_err()
                .contains("unknown time zone \"Mars/Olympus\"")
        );
        assert!(time_zone(Some("Europe/Berlin")).is_ok());
    }

    #[test]
    fn terminal_idle_time_is_the_newest_numbered_terminals_access() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let touch = |name: &str, ago: u64| {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            let at = now - Duration::from_secs(ago);
            f.set_times(std::fs::FileTimes::new().set_accessed(at).set_modified(at))
                .unwrap();
        };
        let idle = || {
            idle_since(&[(dir.path(), "tty")], Timestamp::try_from(now).unwrap())
                .map(|d| d.as_secs())
        };
        assert_eq!(idle(), None, "no terminal: unknown");
        touch("tty", 1);
        touch("ttyS0", 2);
        touch("ttyx", 3);
        assert_eq!(idle(), None, "not numbered terminals");
        touch("tty7", 600);
        assert_eq!(idle(), Some(600));
        touch("tty2", 120);
        assert_eq!(idle(), Some(120), "the newest counts");
    }

    #[test]
    fn load_files_parse_like_proc_loadavg() {
        assert_eq!(parse_load("0.52 0.58 0.59 1/467 12345\n"), Some(0.52));
        assert_eq!(parse_load("3\n"), Some(3.0));
        assert_eq!(parse_load(""), None);
        assert_eq!(parse_load("busy"), None);
        assert_eq!(parse_load("-1 0 0"), None);
        assert_eq!(parse_load("NaN 0 0"), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loadavg");
        std::fs::write(&path, "4.00 1.00 1.00 1/1 1\n").unwrap();
        assert_eq!(read_load(&path), Ok(4.0));
        assert!(
            read_load(&dir.path().join("missing"))
                .unwrap_err()
                .contains("missing")
        );
    }
}
