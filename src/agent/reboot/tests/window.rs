//! Maintenance windows: their arithmetic across time zones and daylight saving, by example and
//! by property.

use jiff::tz::AmbiguousOffset;
use proptest::prelude::*;

use super::super::*;
use super::{strings, ts, window};

const ZONES: &[&str] = &[
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    // Daylight saving started at midnight (00:00 did not exist) until 2019.
    "America/Sao_Paulo",
];

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

#[test]
fn the_next_weekend_window_in_berlin() {
    let w = window(&["Sat", "Sun"], "02:00", "2h", "Europe/Berlin");
    // Friday noon UTC in November (CET, +01:00): Saturday 02:00 CET is 01:00 UTC.
    let now = ts("2026-11-27T12:00:00Z");
    assert_eq!(
        window_containing_or_next(&w, now),
        (ts("2026-11-28T01:00:00Z"), ts("2026-11-28T03:00:00Z"))
    );
    // Inside Saturday's window: that one.
    let now = ts("2026-11-28T02:59:59Z");
    assert_eq!(
        window_containing_or_next(&w, now).0,
        ts("2026-11-28T01:00:00Z")
    );
    // At its end: Sunday's.
    let now = ts("2026-11-28T03:00:00Z");
    assert_eq!(
        window_containing_or_next(&w, now).0,
        ts("2026-11-29T01:00:00Z")
    );
    // After Sunday's: next Saturday.
    let now = ts("2026-11-29T03:00:00Z");
    assert_eq!(
        window_containing_or_next(&w, now).0,
        ts("2026-12-05T01:00:00Z")
    );
    // Summer time (CEST, +02:00).
    let now = ts("2026-07-01T00:00:00Z");
    assert_eq!(
        window_containing_or_next(&w, now).0,
        ts("2026-07-04T00:00:00Z")
    );
}

#[test]
fn a_window_crossing_midnight_and_the_weeks_end_belongs_to_its_start_day() {
    // Sunday 23:00 for 3 hours: open on Monday at 01:00, not open on Sunday at 01:00.
    let w = window(&["Sun"], "23:00", "3h", "UTC");
    let sunday_night = ts("2026-11-29T23:00:00Z");
    assert_eq!(
        window_containing_or_next(&w, ts("2026-11-30T01:00:00Z")),
        (sunday_night, ts("2026-11-30T02:00:00Z"))
    );
    assert_eq!(
        window_containing_or_next(&w, ts("2026-11-29T01:00:00Z")).0,
        sunday_night
    );
    assert!(in_window(&w, ts("2026-11-30T01:59:59Z")));
    assert!(!in_window(&w, ts("2026-11-30T02:00:00Z")));
    // A week long: always open, from the last Sunday 23:00.
    let w = window(&["Sun"], "23:00", "7d", "UTC");
    assert_eq!(
        window_containing_or_next(&w, ts("2026-11-29T22:59:59Z")),
        (ts("2026-11-22T23:00:00Z"), sunday_night)
    );
}

#[test]
fn overlapping_windows_give_the_one_that_opened_first() {
    let w = window(&["Mon", "Tue"], "00:00", "36h", "UTC");
    // Tuesday 06:00: Monday's window (until Tue 12:00) and Tuesday's are both open.
    assert_eq!(
        window_containing_or_next(&w, ts("2026-11-24T06:00:00Z")),
        (ts("2026-11-23T00:00:00Z"), ts("2026-11-24T12:00:00Z"))
    );
    assert_eq!(
        window_containing_or_next(&w, ts("2026-11-24T12:00:00Z")).0,
        ts("2026-11-24T00:00:00Z")
    );
}

#[test]
fn a_start_in_the_spring_forward_gap_moves_forward_by_the_gap() {
    // 2026-03-29 is the last Sunday in March: Berlin goes from 02:00 CET to 03:00 CEST.
    let w = window(&["Sun"], "02:30", "1h", "Europe/Berlin");
    let (start, end) = window_containing_or_next(&w, ts("2026-03-28T12:00:00Z"));
    // 02:30 does not exist; compatible: 03:30 CEST = 01:30 UTC. The length is absolute.
    assert_eq!(start, ts("2026-03-29T01:30:00Z"));
    assert_eq!(end, ts("2026-03-29T02:30:00Z"));
    assert_eq!(
        start.to_zoned(w.time_zone.clone()).time(),
        Time::constant(3, 30, 0, 0)
    );
}

#[test]
fn a_start_in_the_autumn_fold_is_its_first_occurrence() {
    // 2026-10-25: Berlin goes from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    let w = window(&["Sun"], "02:30", "2h", "Europe/Berlin");
    let (start, end) = window_containing_or_next(&w, ts("2026-10-24T12:00:00Z"));
    assert_eq!(start, ts("2026-10-25T00:30:00Z")); // 02:30 CEST
    assert_eq!(end, ts("2026-10-25T02:30:00Z")); // 2 hours later: 03:30 CET
    // During the second 02:30 the window is still open.
    assert_eq!(
        window_containing_or_next(&w, ts("2026-10-25T01:30:00Z")).0,
        start
    );
}

#[test]
fn half_hour_daylight_saving_and_odd_offsets() {
    // Lord Howe Island moves its clocks by 30 minutes: 2026-10-04 02:00 -> 02:30 (+11:00).
    let w = window(&["Sun"], "02:10", "1h", "Australia/Lord_Howe");
    let (start, _) = window_containing_or_next(&w, ts("2026-10-03T00:00:00Z"));
    assert_eq!(
        start.to_zoned(w.time_zone.clone()).time(),
        Time::constant(2, 40, 0, 0)
    );
    assert_eq!(start, ts("2026-10-03T15:40:00Z"));
    // Kathmandu is +05:45 all year.
    let w = window(&["Mon"], "00:00", "1h", "Asia/Kathmandu");
    assert_eq!(
        window_containing_or_next(&w, ts("2026-11-21T12:00:00Z")).0,
        ts("2026-11-22T18:15:00Z")
    );
}

#[test]
fn moments_are_inside_the_rest_of_the_window() {
    let (s, e) = (ts("2026-11-28T01:00:00Z"), ts("2026-11-28T03:00:00Z"));
    let before = ts("2026-11-27T00:00:00Z");
    assert_eq!(pick_moment(s, e, before, 0.0), s);
    assert_eq!(pick_moment(s, e, before, 0.5), ts("2026-11-28T02:00:00Z"));
    assert_eq!(
        pick_moment(s, e, before, 0.999_999_999_9),
        ts("2026-11-28T02:59:59Z")
    );
    assert_eq!(pick_moment(s, e, before, 7.0), ts("2026-11-28T02:59:59Z"));
    assert_eq!(pick_moment(s, e, before, f64::NAN), s);
    assert_eq!(pick_moment(s, e, before, -1.0), s);
    let inside = ts("2026-11-28T02:00:00Z");
    assert_eq!(pick_moment(s, e, inside, 0.0), inside);
    assert_eq!(pick_moment(s, e, inside, 0.5), ts("2026-11-28T02:30:00Z"));
    // The window is over: nothing later than now.
    assert_eq!(pick_moment(s, e, e, 0.5), e);
}

// ---- decisions ----

fn arb_window() -> impl Strategy<Value = Window> {
    (
        proptest::sample::subsequence(DAY_NAMES.to_vec(), 1..=7),
        0u32..24,
        0u32..60,
        // Up to a week, in minutes, with short lengths more likely.
        prop_oneof![1u64..=180, 1u64..=7 * 24 * 60],
        proptest::sample::select(ZONES),
    )
        .prop_map(|(days, h, m, minutes, zone)| {
            Window::parse(
                &strings(&days),
                &format!("{h:02}:{m:02}"),
                &format!("{minutes}m"),
                zone,
            )
            .unwrap()
        })
}

/// 1990 to 2040.
fn arb_now() -> impl Strategy<Value = Timestamp> {
    (631_152_000i64..2_208_988_800).prop_map(|s| Timestamp::from_second(s).unwrap())
}

/// When a window opening on `date` starts, worked out from the offsets (independently of
/// `Window::opening_on`): the start time with the offset in force before a gap or fold.
fn expected_opening(w: &Window, d: Date) -> Timestamp {
    let dt = d.to_datetime(w.start);
    let offset = match w.time_zone.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset,
        AmbiguousOffset::Gap { before, .. } | AmbiguousOffset::Fold { before, .. } => before,
    };
    offset.to_timestamp(dt).unwrap()
}

fn local_date(w: &Window, t: Timestamp) -> Date {
    t.to_zoned(w.time_zone.clone()).date()
}

fn length(w: &Window) -> SignedDuration {
    SignedDuration::try_from(w.length).unwrap()
}

/// Checks one window answer against the definition, by enumerating the openings around it.
fn check_window(w: &Window, now: Timestamp) -> Result<(), TestCaseError> {
    let (start, end) = window_containing_or_next(w, now);
    prop_assert!(start != Timestamp::MAX);
    prop_assert_eq!(end.duration_since(start), length(w));
    // It contains now or lies ahead: both mean that it ends after now.
    prop_assert!(now < end);
    // It opens on a listed day at the start time (moved by a gap when that time did not exist).
    let local = start.to_zoned(w.time_zone.clone());
    let opening_day = (-1i64..=1)
        .filter_map(|o| local.date().checked_add(o.days()).ok())
        .find(|d| w.days.contains(&d.weekday()) && expected_opening(w, *d) == start);
    prop_assert!(opening_day.is_some(), "start {} is no opening", local);
    if local.time() != w.start {
        let d = opening_day.unwrap();
        prop_assert!(
            matches!(
                w.time_zone
                    .to_ambiguous_timestamp(d.to_datetime(w.start))
                    .offset(),
                AmbiguousOffset::Gap { .. }
            ),
            "{} opens at {} but {} exists",
            d,
            local,
            w.start
        );
    }
    // No window opens between now and it; when it is ahead, none is open now; when it is open,
    // none open now opened before it.
    let first = local_date(w, now).checked_sub(9.days()).unwrap();
    let last = local.date().checked_add(1.days()).unwrap();
    let mut d = first;
    while d <= last {
        if w.days.contains(&d.weekday()) {
            let s = expected_opening(w, d);
            let e = s.checked_add(length(w)).unwrap();
            prop_assert!(!(now < s && s < start), "{} opens before {}", s, start);
            if s <= now && now < e {
                prop_assert!(
                    start <= now,
                    "{} is open at {} but {} was given",
                    s,
                    now,
                    start
                );
                prop_assert!(start <= s, "{} opened before {}", s, start);
            }
        }
        d = d.tomorrow().unwrap();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn windows_contain_now_or_come_next(w in arb_window(), now in arb_now()) {
        check_window(&w, now)?;
    }

    #[test]
    fn moments_and_decisions_stay_inside_the_window(
        w in arb_window(),
        now in arb_now(),
        r in 0.0f64..1.0,
        r2 in 0.0f64..1.0,
    ) {
        let (start, end) = window_containing_or_next(&w, now);
        let m = pick_moment(start, end, now, r);
        prop_assert!(start.max(now) <= m && m < end);
        match decide(Policy::Window, Some(&w), true, now, r, None) {
            Decision::RebootNow => prop_assert!(start <= now && now < end),
            Decision::RebootAt(t) => {
                prop_assert!(t > now && start <= t && t < end);
                // Planned: the same answer on the next poll, whatever the random number.
                prop_assert_eq!(
                    decide(Policy::Window, Some(&w), true, now, r2, Some(t)),
                    Decision::RebootAt(t)
                );
                // And at that moment (a window is open at least until then): reboot now.
                prop_assert_eq!(
                    decide(Policy::Window, Some(&w), true, t, r2, Some(t)),
                    Decision::RebootNow
                );
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

/// Daylight saving transitions in the zones that have them, 1990 to 2040.
static TRANSITIONS: std::sync::LazyLock<Vec<(&'static str, Timestamp)>> =
    std::sync::LazyLock::new(|| {
        let mut all = Vec::new();
        for zone in ZONES {
            let tz = time_zone(zone).unwrap();
            let from = ts("1990-01-01T00:00:00Z");
            let to = ts("2040-01-01T00:00:00Z");
            for t in tz.following(from) {
                if t.timestamp() > to {
                    break;
                }
                all.push((*zone, t.timestamp()));
            }
        }
        all
    });

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Windows opening in or near a gap or fold, with `now` around the transition.
    #[test]
    fn windows_around_daylight_saving_changes(
        pick in any::<prop::sample::Index>(),
        // The start time: the local time of the transition, moved by up to 90 minutes.
        shift in -90i64..=90,
        now_shift in -3 * 86_400i64..=3 * 86_400,
        extra_days in proptest::sample::subsequence(DAY_NAMES.to_vec(), 0..=2),
        minutes in prop_oneof![1u64..=180, 1u64..=7 * 24 * 60],
    ) {
        let all = &*TRANSITIONS;
        prop_assume!(!all.is_empty());
        let (zone, at) = all[pick.index(all.len())];
        let tz = time_zone(zone).unwrap();
        // The wall clock just before the transition, shifted, rounded to a minute.
        let before = at.checked_sub(SignedDuration::from_secs(1)).unwrap().to_zoned(tz.clone());
        let clock = before.datetime().checked_add(SignedDuration::from_secs(shift * 60 + 1)).unwrap();
        let start = format!("{:02}:{:02}", clock.hour(), clock.minute());
        let mut days = strings(&extra_days);
        days.push(DAY_NAMES[clock.date().weekday().to_monday_zero_offset() as usize].to_string());
        let w = Window::parse(&days, &start, &format!("{minutes}m"), zone).unwrap();
        let now = at.checked_add(SignedDuration::from_secs(now_shift)).unwrap();
        check_window(&w, now)?;
    }
}
