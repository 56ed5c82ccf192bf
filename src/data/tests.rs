use super::*;
use flate2::write::GzEncoder;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh empty directory under the system temp dir.
fn tmpdir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "genrec-data-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn opts(kcore: usize, split: SplitKind, max_history: usize) -> PrepareOptions {
    PrepareOptions { kcore, split, max_history, ..Default::default() }
}

fn err_of<T: std::fmt::Debug>(r: Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

fn raw(rows: &[(&str, &str, i64)]) -> RawDataset {
    RawDataset {
        name: "t".into(),
        interactions: rows
            .iter()
            .map(|&(u, i, t)| RawInteraction { user: u.into(), item: i.into(), timestamp: t, rating: None })
            .collect(),
        ..Default::default()
    }
}

fn seq_raw(p: &Prepared, u: usize) -> Vec<&str> {
    p.sequence(u).iter().map(|&i| p.item_ids[i as usize].as_str()).collect()
}

#[test]
fn kcore_iterates_to_fixed_point() {
    // 2-core: C has one interaction -> removed in round 1; then u3 has one
    // interaction left (A) -> removed in round 2; A keeps u1, u2.
    let r = raw(&[("u1", "A", 1), ("u1", "B", 2), ("u2", "A", 1), ("u2", "B", 2), ("u3", "A", 1), ("u3", "C", 2)]);
    let p = prepare(&r, &opts(2, SplitKind::LeaveOneOut, 20)).unwrap();
    assert_eq!(p.user_ids, vec!["u1", "u2"]);
    assert_eq!(p.item_ids, vec!["A", "B"]);
    assert_eq!(p.stats.kcore_removed, 2);
    assert_eq!(p.stats.kcore_rounds, 2);
    assert_eq!(p.stats.interactions, 4);
    // Every remaining user and item has >= k interactions.
    let mut ic = vec![0; p.n_items()];
    p.items.iter().for_each(|&i| ic[i as usize] += 1);
    assert!(ic.iter().all(|&c| c >= 2));
    assert!((0..p.n_users()).all(|u| p.sequence(u).len() >= 2));
    // kcore 0 keeps everything.
    assert_eq!(prepare(&r, &opts(0, SplitKind::LeaveOneOut, 20)).unwrap().stats.interactions, 6);
    // Everything removed -> error naming the dataset and the counts.
    let e = err_of(prepare(&r, &opts(5, SplitKind::LeaveOneOut, 20)));
    assert!(e.contains("empty after filtering") && e.contains("5-core") && e.contains("'t'"), "{e}");
    assert!(err_of(prepare(&raw(&[]), &PrepareOptions::default())).contains("no interactions"));
}

#[test]
fn chronological_order_with_stable_ties_and_dedup() {
    // File order X(5) Y(3) Z(3) W(1) Y(7, duplicate): chronological W, Y, Z, X;
    // equal timestamps keep file order; the later Y is dropped.
    let r = raw(&[("u", "X", 5), ("u", "Y", 3), ("u", "Z", 3), ("u", "W", 1), ("u", "Y", 7)]);
    let p = prepare(&r, &opts(0, SplitKind::LeaveOneOut, 20)).unwrap();
    assert_eq!(seq_raw(&p, 0), vec!["W", "Y", "Z", "X"]);
    assert_eq!(p.times, vec![1, 3, 3, 5]);
    assert_eq!(p.stats.duplicates_removed, 1);
    let p = prepare(&r, &PrepareOptions { dedup: false, kcore: 0, ..Default::default() }).unwrap();
    assert_eq!(seq_raw(&p, 0), vec!["W", "Y", "Z", "X", "Y"]);
    // Numeric raw ids get numeric dense order.
    let p = prepare(&raw(&[("10", "2", 1), ("9", "10", 1), ("10", "10", 2)]), &opts(0, SplitKind::LeaveOneOut, 20))
        .unwrap();
    assert_eq!(p.user_ids, vec!["9", "10"]);
    assert_eq!(p.item_ids, vec!["2", "10"]);
}

#[test]
fn leave_one_out_split_samples_and_cases() {
    // u1: a b c d e (5 items), u2: c d (2 items: training only).
    let r = raw(&[
        ("u1", "a", 1),
        ("u1", "b", 2),
        ("u1", "c", 3),
        ("u1", "d", 4),
        ("u1", "e", 5),
        ("u2", "c", 1),
        ("u2", "d", 2),
    ]);
    let p = prepare(&r, &opts(0, SplitKind::LeaveOneOut, 2)).unwrap();
    let id = |s: &str| p.item_ids.iter().position(|x| x == s).unwrap() as u32;
    assert_eq!(p.split, vec![0, 0, 0, 1, 2, 0, 0]);
    assert_eq!(p.train_sequence(0), vec![id("a"), id("b"), id("c")]);
    // Prefix samples, history truncated to the 2 most recent items.
    let s = p.train_samples(false);
    let got: Vec<(u32, Vec<u32>, u32)> = s.iter().map(|x| (x.user, x.history.clone(), x.target)).collect();
    assert_eq!(
        got,
        vec![(0, vec![id("a")], id("b")), (0, vec![id("a"), id("b")], id("c")), (1, vec![id("c")], id("d")),]
    );
    assert_eq!(p.stats.train_samples, 3);
    assert_eq!(p.train_samples(true).len(), 5);
    let v = p.eval_cases(Split::Valid);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].history, vec![id("b"), id("c")]);
    assert_eq!(v[0].seen, vec![id("a"), id("b"), id("c")]);
    assert_eq!(v[0].targets, vec![id("d")]);
    let t = p.eval_cases(Split::Test);
    assert_eq!(t[0].history, vec![id("c"), id("d")]);
    assert_eq!(t[0].targets, vec![id("e")]);
    assert_eq!(t[0].seen.len(), 4);
    assert!(p.eval_cases(Split::Train).is_empty());
    assert_eq!((p.stats.valid_users, p.stats.test_users), (1, 1));
    // Unlimited history.
    let p = prepare(&r, &opts(0, SplitKind::LeaveOneOut, 0)).unwrap();
    assert_eq!(p.eval_cases(Split::Test)[0].history.len(), 4);
}

#[test]
fn temporal_split_with_warm_and_cold_items() {
    // 10 interactions, global times 1..10: 8 train, 1 valid (t=9), 1 test (t=10).
    let r = raw(&[
        ("u1", "a", 1),
        ("u2", "a", 2),
        ("u1", "b", 3),
        ("u2", "b", 4),
        ("u3", "a", 5),
        ("u3", "b", 6),
        ("u1", "c", 7),
        ("u2", "c", 8),
        ("u3", "d", 9),
        ("u1", "e", 10),
    ]);
    let p = prepare(&r, &opts(0, SplitKind::TEMPORAL_811, 20)).unwrap();
    assert_eq!((p.stats.train_interactions, p.stats.valid_interactions, p.stats.test_interactions), (8, 1, 1));
    let warm = p.warm_items();
    let id = |s: &str| p.item_ids.iter().position(|x| x == s).unwrap();
    assert!(warm[id("a")] && warm[id("c")] && !warm[id("d")] && !warm[id("e")]);
    assert_eq!((p.stats.cold_items_valid, p.stats.cold_items_test), (1, 1));
    let v = p.eval_cases(Split::Valid);
    assert_eq!(v.len(), 1);
    assert_eq!(p.user_ids[v[0].user as usize], "u3");
    assert_eq!(v[0].history.len(), 2);
    let t = p.eval_cases(Split::Test);
    assert_eq!(p.user_ids[t[0].user as usize], "u1");
    assert_eq!(t[0].history.len(), 3);
    // Labels never decrease within a user.
    for u in 0..p.n_users() {
        let r = p.range(u);
        assert!(p.split[r].windows(2).all(|w| w[0] <= w[1]));
    }
    // Several test targets per user, deduplicated.
    let r2 = raw(&[
        ("u", "a", 1),
        ("u", "b", 2),
        ("u", "c", 3),
        ("u", "d", 4),
        ("u", "e", 5),
        ("v", "a", 6),
        ("u", "x", 7),
        ("u", "y", 8),
        ("u", "z", 9),
        ("u", "w", 10),
    ]);
    let p = prepare(
        &r2,
        &PrepareOptions { kcore: 0, split: SplitKind::Temporal { train: 0.5, valid: 0.1 }, ..Default::default() },
    )
    .unwrap();
    let t = p.eval_cases(Split::Test);
    assert_eq!(t[0].targets.len(), 4);
    assert!(prepare(
        &r2,
        &PrepareOptions { split: SplitKind::Temporal { train: 0.9, valid: 0.2 }, ..Default::default() }
    )
    .is_err());
    assert_eq!(SplitKind::parse("temporal").unwrap(), SplitKind::TEMPORAL_811);
    assert!(SplitKind::parse("random").is_err());
}

const INTER: &str = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n";

#[test]
fn recbole_atomic_files() {
    let d = tmpdir("atomic");
    let mut s = String::from(INTER);
    for u in 1..=3 {
        for i in 1..=3 {
            s.push_str(&format!("{u}\t{i}\t4\t{}\n", 880000000 + u * 10 + i));
        }
    }
    s.push('\n');
    write(&d, "ml-100k.inter", s.as_bytes());
    write(
        &d,
        "ml-100k.item",
        b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tAnimation Children's Comedy\n2\tGoldenEye\t1995\tAction Adventure Thriller\n3\tFour Rooms\t1995\tThriller\n99\tUnused\t1990\tDrama\n",
    );
    let r = load(Format::Ml100k, &d).unwrap();
    assert_eq!(r.name, "ml-100k");
    assert_eq!(r.interactions.len(), 9);
    assert_eq!(r.interactions[0].rating, Some(4.0));
    let p = prepare(&r, &opts(3, SplitKind::LeaveOneOut, 20)).unwrap();
    assert_eq!((p.n_users(), p.n_items()), (3, 3));
    assert_eq!(p.item_text(0), "Toy Story (1995). Categories: Animation, Children's, Comedy");
    assert_eq!(input_files(Format::Ml100k, &d).unwrap().len(), 2);

    // Malformed line: wrong field count, names file and line.
    write(&d, "ml-100k.inter", format!("{INTER}1\t2\t3\t4\n1\t2\t3\n").as_bytes());
    let e = err_of(load(Format::Ml100k, &d));
    assert!(e.contains("ml-100k.inter:3") && e.contains("expected 4"), "{e}");
    // Bad timestamp.
    write(&d, "ml-100k.inter", format!("{INTER}1\t2\t3\tsoon\n").as_bytes());
    assert!(err_of(load(Format::Ml100k, &d)).contains("ml-100k.inter:2: bad timestamp"));
    // Untyped header.
    write(&d, "ml-100k.inter", b"user_id\titem_id\ttimestamp\n1\t2\t3\n");
    assert!(err_of(load(Format::Ml100k, &d)).contains("ml-100k.inter:1"));
    // Missing column.
    write(&d, "ml-100k.inter", b"user_id:token\titem_id:token\n1\t2\n");
    assert!(err_of(load(Format::Ml100k, &d)).contains("timestamp"));
    // Non-UTF-8 bytes in the item file.
    write(&d, "ml-100k.inter", format!("{INTER}1\t2\t3\t4\n").as_bytes());
    write(&d, "ml-100k.item", b"item_id:token\tmovie_title:token_seq\n1\tCaf\xe9\n");
    let e = err_of(load(Format::Ml100k, &d));
    assert!(e.contains("ml-100k.item:2") && e.contains("UTF-8"), "{e}");
    // Duplicate item rows.
    write(&d, "ml-100k.item", b"item_id:token\tmovie_title:token_seq\n1\tA\n1\tB\n");
    assert!(err_of(load(Format::Ml100k, &d)).contains("ml-100k.item:3"));
    // Empty directory.
    let e2 = tmpdir("atomic-empty");
    assert!(err_of(load(Format::Ml100k, &e2)).contains("no RecBole"));
    assert!(err_of(load(Format::Ml100k, &e2.join("missing"))).contains("not a directory"));
}

#[test]
fn movielens_latest_small_csv() {
    let d = tmpdir("mls");
    write(
        &d,
        "ratings.csv",
        b"userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,3.5,101\n2,10,5.0,102\n2,20,1.0,103\n3,30,2.0,104\n",
    );
    write(
        &d,
        "movies.csv",
        "movieId,title,genres\n10,\"American President, The (1995)\",Comedy|Drama|Romance\n20,\"Quoted \"\"Title\"\" (2001)\",(no genres listed)\n30,Plain,Drama\n"
            .as_bytes(),
    );
    write(
        &d,
        "tags.csv",
        b"userId,movieId,tag,timestamp\n1,10,\"funny, smart\",150\n9,10,unknown user,151\n1,99,unknown movie,152\n2,20,dull,90\n",
    );
    let r = load(Format::MlLatestSmall, &d).unwrap();
    assert_eq!(r.interactions.len(), 5);
    assert_eq!(r.interactions[1].rating, Some(3.5));
    let m = &r.items["10"];
    assert_eq!(m.title.as_deref(), Some("American President, The"));
    assert_eq!(m.year.as_deref(), Some("1995"));
    assert_eq!(m.categories, vec!["Comedy", "Drama", "Romance"]);
    assert_eq!(r.items["20"].title.as_deref(), Some("Quoted \"Title\""));
    assert!(r.items["20"].categories.is_empty());
    assert_eq!(r.user_texts.len(), 2);
    assert_eq!(r.user_texts[0].text, "funny, smart");
    assert_eq!(r.report.skipped["tag for a user or movie without ratings"], 2);
    let p = prepare(&r, &opts(2, SplitKind::LeaveOneOut, 20)).unwrap();
    assert_eq!((p.n_users(), p.n_items()), (2, 2));
    assert_eq!(p.user_texts.len(), 2);
    assert!(p.user_texts.iter().all(|t| t.split == Split::Train && t.kind == TextKind::Tag));

    // Errors name file and line.
    write(&d, "ratings.csv", b"userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,3.5\n");
    let e = err_of(load(Format::MlLatestSmall, &d));
    assert!(e.contains("ratings.csv:3") && e.contains("expected 4 fields"), "{e}");
    write(&d, "ratings.csv", b"userId,movieId,rating,timestamp\n1,10,4.0,100\n1,20,x,101\n");
    let e = err_of(load(Format::MlLatestSmall, &d));
    assert!(e.contains("ratings.csv:3") && e.contains("bad rating"), "{e}");
    write(&d, "ratings.csv", b"userId,movieId,rating,timestamp\n1,10,4.0,100\n");
    write(&d, "movies.csv", b"movieId,title,genres\n10,Caf\xe9,Drama\n");
    let e = err_of(load(Format::MlLatestSmall, &d));
    assert!(e.contains("movies.csv:2") && e.contains("UTF-8"), "{e}");
    write(&d, "movies.csv", b"id,title\n10,x\n");
    assert!(err_of(load(Format::MlLatestSmall, &d)).contains("movies.csv:1: header has no column 'movieId'"));
}

#[test]
fn amazon_2014_gzipped_with_python_literal_meta() {
    let d = tmpdir("amz14");
    let reviews = r#"{"reviewerID": "A1", "asin": "B001", "reviewerName": "x", "helpful": [0, 0], "reviewText": "Great product, works.", "overall": 5.0, "summary": "Great", "unixReviewTime": 1300000000, "reviewTime": "03 13, 2011"}
{"reviewerID": "A1", "asin": "B002", "reviewText": "", "overall": 3.0, "summary": "Meh", "unixReviewTime": 1300000100}
{"reviewerID": "A2", "asin": "B001", "reviewText": "Nice", "overall": 4.0, "summary": "ok", "unixReviewTime": 1300000200}
{"reviewerID": "A2", "asin": "B002", "overall": 4.0, "unixReviewTime": 1300000300}
"#;
    let meta = r#"{'asin': 'B001', 'title': "Girls' Ballet Tutu", 'price': 3.17, 'imUrl': 'http://x/y.jpg', 'related': {'also_bought': ['B002']}, 'salesRank': {'Toys & Games': 211836}, 'categories': [['Beauty', 'Makeup'], ['Beauty', 'Face']], 'description': 'Caf\xc3\xa9 quality', 'brand': 'Coxlures'}
{'asin': 'B002', 'categories': [['Beauty']], 'title': 'Second', 'price': None}
{'asin': 'B999', 'title': 'Never reviewed'}
"#;
    write(&d, "reviews_Beauty_5.json.gz", &gz(reviews.as_bytes()));
    write(&d, "meta_Beauty.json.gz", &gz(meta.as_bytes()));
    let r = load(Format::Amazon, &d).unwrap();
    assert_eq!(r.name, "Beauty");
    assert_eq!(r.interactions.len(), 4);
    assert_eq!(r.items.len(), 2);
    assert_eq!(r.report.skipped["metadata for an item without reviews"], 1);
    let m = &r.items["B001"];
    assert_eq!(m.title.as_deref(), Some("Girls' Ballet Tutu"));
    assert_eq!(m.categories, vec!["Beauty", "Makeup", "Face"]);
    assert_eq!(m.description.as_deref(), Some("Café quality"));
    assert_eq!(m.brand.as_deref(), Some("Coxlures"));
    // Review text + summary kept as user texts; empty review skipped.
    let kinds: Vec<TextKind> = r.user_texts.iter().map(|t| t.kind).collect();
    assert_eq!(
        kinds,
        vec![TextKind::Review, TextKind::Summary, TextKind::Summary, TextKind::Review, TextKind::Summary]
    );
    let p = prepare(&r, &opts(2, SplitKind::LeaveOneOut, 20)).unwrap();
    assert_eq!((p.n_users(), p.n_items(), p.stats.user_texts), (2, 2, 5));

    // Truncated gzip -> error naming the file.
    let full = gz(reviews.repeat(200).as_bytes());
    write(&d, "reviews_Beauty_5.json.gz", &full[..full.len() / 2]);
    let e = err_of(load(Format::Amazon, &d));
    assert!(e.contains("reviews_Beauty_5.json.gz:") && e.contains("truncated or corrupt"), "{e}");
    // Malformed JSON line 2.
    write(
        &d,
        "reviews_Beauty_5.json.gz",
        &gz(b"{\"reviewerID\": \"A1\", \"asin\": \"B001\", \"unixReviewTime\": 1}\n{\"reviewerID\": \"A1\", \n"),
    );
    let e = err_of(load(Format::Amazon, &d));
    assert!(e.contains("reviews_Beauty_5.json.gz:2"), "{e}");
    // Missing field.
    write(&d, "reviews_Beauty_5.json.gz", &gz(b"{\"reviewerID\": \"A1\", \"asin\": \"B001\"}\n"));
    assert!(err_of(load(Format::Amazon, &d)).contains(":1: missing or bad 'unixReviewTime'"));
    // Two review files are ambiguous.
    write(&d, "other.json", b"");
    assert!(err_of(load(Format::Amazon, &d)).contains("exactly one"));
}

#[test]
fn amazon_2018_strict_json() {
    let d = tmpdir("amz18");
    let reviews = r#"{"overall": 5.0, "verified": true, "reviewTime": "09 1, 2016", "reviewerID": "U1", "asin": "I1", "style": {"Size:": " Large"}, "reviewerName": "a", "reviewText": "Loved it", "summary": "Five Stars", "unixReviewTime": 1472688000}
{"overall": 4.0, "reviewerID": "U1", "asin": "I2", "unixReviewTime": 1472688001, "reviewText": "ok"}
{"overall": 4.0, "reviewerID": "U2", "asin": "I1", "unixReviewTime": 1472688002}
{"overall": 4.0, "reviewerID": "U2", "asin": "I2", "unixReviewTime": 1472688002}
"#;
    let meta = r#"{"category": ["Toys & Games", "Puzzles"], "description": ["A puzzle.", "1000 pieces."], "title": "Jigsaw", "brand": "Ravensburger", "feature": [], "asin": "I1"}
{"category": [], "description": [], "title": "Plain", "brand": "", "asin": "I2"}
"#;
    write(&d, "Toys_and_Games_5.json", reviews.as_bytes());
    write(&d, "meta_Toys_and_Games.json", meta.as_bytes());
    let r = load(Format::Amazon, &d).unwrap();
    assert_eq!(r.name, "Toys_and_Games");
    let m = &r.items["I1"];
    assert_eq!(m.description.as_deref(), Some("A puzzle. 1000 pieces."));
    assert_eq!(m.categories, vec!["Toys & Games", "Puzzles"]);
    assert_eq!(r.items["I2"].brand, None);
    // Equal timestamps (U2) keep file order.
    let p = prepare(&r, &opts(2, SplitKind::LeaveOneOut, 20)).unwrap();
    assert_eq!(seq_raw(&p, 1), vec!["I1", "I2"]);
    assert_eq!(
        p.item_text(0),
        "Jigsaw. Categories: Toys & Games, Puzzles. Brand: Ravensburger. A puzzle. 1000 pieces."
    );
    // Non-UTF-8 bytes in a review line.
    write(
        &d,
        "Toys_and_Games_5.json",
        b"{\"reviewerID\": \"U1\", \"asin\": \"I1\", \"unixReviewTime\": 1, \"reviewText\": \"\xff\"}\n",
    );
    let e = err_of(load(Format::Amazon, &d));
    assert!(e.contains("Toys_and_Games_5.json:1") && e.contains("UTF-8"), "{e}");
}

#[test]
fn generic_format_with_items_jsonl() {
    let d = tmpdir("generic");
    write(
        &d,
        "interactions.csv",
        b"timestamp,user,item,text\n1,alice,i1,\"first, note\"\n2,alice,i2,\n3,bob,i1,\n3,bob,i2,\n",
    );
    write(
        &d,
        "items.jsonl.gz",
        &gz(b"{\"item\": \"i1\", \"text\": \"Item one text\"}\n\n{\"item\": \"i2\", \"title\": \"Two\", \"description\": \"Desc\", \"categories\": [\"c\"]}\n{\"item\": 3}\n"),
    );
    let r = load(Format::Generic, &d).unwrap();
    assert_eq!(r.interactions.len(), 4);
    assert_eq!(r.user_texts.len(), 1);
    assert_eq!(r.report.skipped["item line without any text field"], 1);
    let p = prepare(&r, &opts(2, SplitKind::LeaveOneOut, 20)).unwrap();
    assert_eq!(p.item_text(0), "Item one text");
    assert_eq!(p.item_text(1), "Two. Categories: c. Desc");
    // Bad JSON and missing id name the line.
    write(&d, "items.jsonl.gz", &gz(b"{\"item\": \"i1\"}\n{oops}\n"));
    assert!(err_of(load(Format::Generic, &d)).contains("items.jsonl.gz:2: invalid JSON"));
    write(&d, "items.jsonl.gz", &gz(b"{\"name\": \"i1\"}\n"));
    assert!(err_of(load(Format::Generic, &d)).contains("items.jsonl.gz:1: missing 'item'"));
    write(&d, "interactions.csv", b"user,item\na,b\n");
    assert!(err_of(load(Format::Generic, &d)).contains("interactions.csv:1: header has no column 'timestamp'"));
    write(&d, "interactions.csv", b"user,item,timestamp\na,,1\n");
    assert!(err_of(load(Format::Generic, &d)).contains("interactions.csv:2"));
    assert!(Format::parse("nope").is_err());
    assert_eq!(Format::parse("ml-latest-small").unwrap(), Format::MlLatestSmall);
}

#[test]
fn prepared_dir_roundtrip_cache_and_corruption() {
    let d = tmpdir("cache-in");
    let out = tmpdir("cache-out").join("prepared");
    let mut s = String::from("user,item,timestamp\n");
    for u in 0..6 {
        for i in 0..6 {
            if (u + i) % 4 != 0 {
                s.push_str(&format!("u{u},i{i},{}\n", u * 100 + i));
            }
        }
    }
    write(&d, "interactions.csv", s.as_bytes());
    let o = PrepareOptions { kcore: 3, split: SplitKind::TEMPORAL_811, ..Default::default() };
    let (p, reused) = prepare_cached(Format::Generic, &d, &out, &o).unwrap();
    assert!(!reused);
    let (q, reused) = prepare_cached(Format::Generic, &d, &out, &o).unwrap();
    assert!(reused);
    assert_eq!(p, q);
    assert_eq!(Prepared::load(&out).unwrap(), p);
    assert!(!out.join("manifest.json.tmp").exists());
    // Other options or changed input -> rebuilt.
    let o2 = PrepareOptions { max_history: 5, ..o.clone() };
    assert!(!prepare_cached(Format::Generic, &d, &out, &o2).unwrap().1);
    s.push_str("u0,i4,999\n");
    write(&d, "interactions.csv", s.as_bytes());
    let (p3, reused) = prepare_cached(Format::Generic, &d, &out, &o2).unwrap();
    assert!(!reused);
    assert_ne!(p3.stats.raw_interactions, p.stats.raw_interactions);
    // Corruption is detected on load and repaired by prepare_cached.
    let a = out.join("arrays.safetensors");
    let mut bytes = std::fs::read(&a).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&a, &bytes).unwrap();
    assert!(err_of(Prepared::load(&out)).contains("sha256"));
    assert!(!prepare_cached(Format::Generic, &d, &out, &o2).unwrap().1);
    assert!(Prepared::load(&out).is_ok());
    let stats = p.stats.to_string();
    assert!(stats.contains("density") && stats.contains("mean sequence length"), "{stats}");
}

/// Where the real ml-100k lives: $GENREC_ML100K, else where `genrec fetch ml-100k` puts it.
fn ml100k_dir() -> Option<PathBuf> {
    let p = match std::env::var("GENREC_ML100K") {
        Ok(p) => PathBuf::from(p),
        Err(_) => crate::io::fetch::local("ml-100k")?,
    };
    p.join("ml-100k.inter").is_file().then_some(p)
}

#[test]
fn real_ml100k_when_present() {
    let Some(dir) = ml100k_dir() else {
        println!("skipped: ml-100k not found (set GENREC_ML100K to the directory holding ml-100k.inter)");
        return;
    };
    let r = load(Format::Ml100k, &dir).unwrap();
    assert_eq!(r.interactions.len(), 100_000);
    assert_eq!(r.items.len(), 1682);
    let p = prepare(&r, &PrepareOptions::default()).unwrap();
    println!("ml-100k (5-core, leave-one-out):\n{}", p.stats);
    // ml-100k is already 20-core on users; 5-core drops only rare items.
    assert_eq!(p.n_users(), 943);
    assert!(p.n_items() > 1300 && p.n_items() < 1682);
    assert_eq!(p.eval_cases(Split::Test).len(), 943);
    assert_eq!(p.stats.items_without_text, 0);
    let t = prepare(&r, &PrepareOptions { split: SplitKind::TEMPORAL_811, ..Default::default() }).unwrap();
    println!("ml-100k (5-core, temporal 8:1:1):\n{}", t.stats);
    assert_eq!(t.stats.train_interactions, t.stats.interactions * 8 / 10);
}

/// Where the real MovieLens latest-small lives: $GENREC_ML_LATEST_SMALL, else
/// where `genrec fetch ml-latest-small` puts it.
fn ml_latest_small_dir() -> Option<PathBuf> {
    let p = match std::env::var("GENREC_ML_LATEST_SMALL") {
        Ok(p) => PathBuf::from(p),
        Err(_) => crate::io::fetch::local("ml-latest-small")?,
    };
    p.join("ratings.csv").is_file().then_some(p)
}

#[test]
fn real_ml_latest_small_when_present() {
    let Some(dir) = ml_latest_small_dir() else {
        println!(
            "skipped: ml-latest-small not found (set GENREC_ML_LATEST_SMALL to the directory holding ratings.csv)"
        );
        return;
    };
    let r = load(Format::MlLatestSmall, &dir).unwrap();
    assert_eq!(r.interactions.len(), 100_004);
    assert!(!r.user_texts.is_empty());
    let p = prepare(&r, &PrepareOptions::default()).unwrap();
    println!("ml-latest-small (5-core, leave-one-out):\n{}", p.stats);
    assert_eq!(p.n_users(), 671);
    assert!(p.stats.user_texts > 0);
}
