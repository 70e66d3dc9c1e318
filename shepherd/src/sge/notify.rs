//! The `qsub -notify` state machine (`shepherd_deliver_signal`): a STOP or KILL is postponed by
//! the queue's `notify` time after a notification signal (default SIGUSR1 before STOP, SIGUSR2
//! before KILL) went to the job.

use std::time::{Duration, Instant};

use super::config::JobConfig;
use super::signals::parse_signal;

/// What to send before a postponed STOP or KILL (`notify_{susp,kill}_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifySignal {
    /// Type 1: SIGUSR1 before STOP, SIGUSR2 before KILL.
    Default,
    /// Type 0: the configured signal.
    Named(i32),
    /// Type 2: no notification; deliver at once.
    None,
}

impl NotifySignal {
    fn from_config(config: &JobConfig, type_key: &str, name_key: &str) -> Self {
        match config.get(type_key).map(str::trim) {
            Some("0") => config
                .get(name_key)
                .and_then(parse_signal)
                .map_or(NotifySignal::Default, NotifySignal::Named),
            Some("2") => NotifySignal::None,
            _ => NotifySignal::Default,
        }
    }
}

/// What the shepherd must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyAction {
    /// Send this notification signal to the job.
    Notify(i32),
    /// Deliver this signal (through the suspend/resume/terminate method, if any).
    Deliver(i32),
}

/// The notify state of one job.
#[derive(Debug, Clone)]
pub struct Notifier {
    delay: Duration,
    before_kill: NotifySignal,
    before_stop: NotifySignal,
    postponed: Option<(i32, Instant)>,
}

impl Notifier {
    pub fn new(delay: Duration, before_kill: NotifySignal, before_stop: NotifySignal) -> Self {
        Notifier {
            delay,
            before_kill,
            before_stop,
            postponed: None,
        }
    }

    /// From `notify`, `notify_kill_type`/`notify_kill` and `notify_susp_type`/`notify_susp`.
    pub fn from_config(config: &JobConfig) -> Self {
        let secs = config
            .get("notify")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Notifier::new(
            Duration::from_secs(secs),
            NotifySignal::from_config(config, "notify_kill_type", "notify_kill"),
            NotifySignal::from_config(config, "notify_susp_type", "notify_susp"),
        )
    }

    /// When the postponed signal is due, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        self.postponed.map(|(_, at)| at)
    }

    /// Handles a signal execd asked for.
    pub fn on_signal(&mut self, sig: i32, now: Instant) -> Vec<NotifyAction> {
        let stop_or_kill = sig == libc::SIGSTOP || sig == libc::SIGKILL;
        if sig == libc::SIGCONT && matches!(self.postponed, Some((libc::SIGSTOP, _))) {
            self.postponed = None;
        }
        if !stop_or_kill || self.delay.is_zero() {
            return vec![NotifyAction::Deliver(sig)];
        }
        if let Some((pending, _)) = self.postponed {
            if pending == sig || (sig == libc::SIGSTOP && pending == libc::SIGKILL) {
                return Vec::new();
            }
        }
        let choice = if sig == libc::SIGKILL {
            self.before_kill
        } else {
            self.before_stop
        };
        let notify = match choice {
            NotifySignal::None => return vec![NotifyAction::Deliver(sig)],
            NotifySignal::Named(n) => n,
            NotifySignal::Default if sig == libc::SIGKILL => libc::SIGUSR2,
            NotifySignal::Default => libc::SIGUSR1,
        };
        self.postponed = Some((sig, now + self.delay));
        vec![NotifyAction::Notify(notify)]
    }

    /// Delivers the postponed signal once its time has come.
    pub fn on_time(&mut self, now: Instant) -> Option<NotifyAction> {
        match self.postponed {
            Some((sig, at)) if now >= at => {
                self.postponed = None;
                Some(NotifyAction::Deliver(sig))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NotifyAction::*;

    const KILL: i32 = libc::SIGKILL;
    const STOP: i32 = libc::SIGSTOP;

    fn n(secs: u64) -> Notifier {
        Notifier::new(
            Duration::from_secs(secs),
            NotifySignal::Default,
            NotifySignal::Default,
        )
    }

    #[test]
    fn without_notify_everything_goes_at_once() {
        let mut m = n(0);
        let t = Instant::now();
        assert_eq!(m.on_signal(KILL, t), vec![Deliver(KILL)]);
        assert_eq!(m.on_signal(STOP, t), vec![Deliver(STOP)]);
        assert_eq!(m.deadline(), None);
    }

    #[test]
    fn kill_is_postponed_after_usr2() {
        let mut m = n(10);
        let t = Instant::now();
        assert_eq!(m.on_signal(KILL, t), vec![Notify(libc::SIGUSR2)]);
        assert_eq!(m.deadline(), Some(t + Duration::from_secs(10)));
        assert_eq!(m.on_time(t + Duration::from_secs(9)), None);
        // a repeated KILL and a STOP while KILL waits are ignored
        assert!(m.on_signal(KILL, t + Duration::from_secs(1)).is_empty());
        assert!(m.on_signal(STOP, t + Duration::from_secs(1)).is_empty());
        assert_eq!(m.on_time(t + Duration::from_secs(10)), Some(Deliver(KILL)));
        assert_eq!(m.deadline(), None);
    }

    #[test]
    fn stop_after_usr1_and_cont_cancels_it() {
        let mut m = n(5);
        let t = Instant::now();
        assert_eq!(m.on_signal(STOP, t), vec![Notify(libc::SIGUSR1)]);
        assert_eq!(m.on_signal(libc::SIGCONT, t), vec![Deliver(libc::SIGCONT)]);
        assert_eq!(m.on_time(t + Duration::from_secs(6)), None);
    }

    #[test]
    fn kill_replaces_a_postponed_stop() {
        let mut m = n(5);
        let t = Instant::now();
        m.on_signal(STOP, t);
        assert_eq!(
            m.on_signal(KILL, t + Duration::from_secs(2)),
            vec![Notify(libc::SIGUSR2)]
        );
        assert_eq!(m.on_time(t + Duration::from_secs(7)), Some(Deliver(KILL)));
    }

    #[test]
    fn other_signals_pass_and_configured_types() {
        let mut m = n(5);
        let t = Instant::now();
        assert_eq!(m.on_signal(libc::SIGUSR1, t), vec![Deliver(libc::SIGUSR1)]);
        let c = JobConfig::parse(
            "notify=3\nnotify_kill_type=0\nnotify_kill=SIGTERM\nnotify_susp_type=2\nnotify_susp=\n",
        );
        let mut m = Notifier::from_config(&c);
        assert_eq!(m.on_signal(STOP, t), vec![Deliver(STOP)]);
        assert_eq!(m.on_signal(KILL, t), vec![Notify(libc::SIGTERM)]);
    }
}
