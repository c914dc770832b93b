//! ListInstances paging against the real binary: pages of any size together return every
//! machine of the app exactly once, in id order; bad sizes and tokens are refused; the CLI
//! follows the pages by itself; a page of the largest records fits the response cap.

mod common;

use common::machine;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{ListInstancesRequest, Machine, UpsertMachinesRequest};
use tonic::Code;
use tonic::transport::Channel;

/// Machines in the paged app: five default pages, and not a multiple of 7.
const MACHINES: usize = 2500;
/// `patina_region::validate::MAX_BATCH`.
const BATCH: usize = 1000;

async fn upsert_all(client: &mut RegionClient<Channel>, machines: Vec<Machine>) {
    for batch in machines.chunks(BATCH) {
        client
            .upsert_machines(UpsertMachinesRequest {
                machines: batch.to_vec(),
            })
            .await
            .unwrap();
    }
}

/// Follow every page of `app` with `page_size`: (ids in order, the size of each page).
async fn all_pages(
    client: &mut RegionClient<Channel>,
    app: &str,
    page_size: i32,
) -> (Vec<String>, Vec<usize>) {
    let pages = patina_testkit::list_pages(client, app, false, page_size).await;
    let sizes = pages.iter().map(Vec::len).collect();
    let ids = pages.into_iter().flatten().map(|m| m.id).collect();
    (ids, sizes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_return_every_machine_once_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    // Written in a scrambled order; ids of mixed lengths so byte order matters.
    let mut expected: Vec<String> = (0..MACHINES).map(|i| format!("m-{i}")).collect();
    let scrambled = (0..MACHINES)
        .map(|i| machine(&expected[i * 7919 % MACHINES], "big", 8080))
        .collect();
    upsert_all(&mut client, scrambled).await;
    upsert_all(&mut client, vec![machine("m-other", "other", 1)]).await;
    expected.sort();

    let cases: Vec<(&str, i32, Vec<usize>)> = vec![
        ("default size", 0, vec![500; 5]),
        ("size 7", 7, [vec![7; 357], vec![1]].concat()),
        ("the maximum", 1000, vec![1000, 1000, 500]),
        ("over the maximum", 5000, vec![1000, 1000, 500]),
    ];
    for (name, size, page_sizes) in cases {
        let (ids, sizes) = all_pages(&mut client, "big", size).await;
        assert_eq!(sizes, page_sizes, "{name}: page sizes");
        assert_eq!(ids, expected, "{name}: every machine once, in id order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_page_sizes_and_tokens_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    upsert_all(
        &mut client,
        // Ids whose hex has letters, for the capitals case.
        (0..3)
            .map(|i| machine(&format!("web-{i}"), "web", 1))
            .collect(),
    )
    .await;
    let request = |page_size: i32, page_token: &str| ListInstancesRequest {
        app: "web".into(),
        include_all: true,
        page_size,
        page_token: page_token.into(),
    };
    let first = client.list_instances(request(1, "")).await.unwrap();
    let token = first.into_inner().next_page_token;
    assert!(!token.is_empty());

    let cases: Vec<(&str, i32, String, &str)> = vec![
        ("negative size", -1, String::new(), "page_size"),
        ("most negative size", i32::MIN, String::new(), "page_size"),
        ("garbage token", 0, "garbage".into(), "page_token"),
        (
            "token without its prefix",
            0,
            token[3..].to_owned(),
            "page_token",
        ),
        (
            "token cut short",
            0,
            token[..token.len() - 1].to_owned(),
            "page_token",
        ),
        (
            "token in capitals",
            0,
            format!("p1.{}", token[3..].to_uppercase()),
            "page_token",
        ),
        ("token of a bad id", 0, "p1.2d78".into(), "page_token"),
        (
            "token of another version",
            0,
            token.replacen("p1.", "p9.", 1),
            "page_token",
        ),
        (
            "huge token",
            0,
            format!("p1.{}", "6".repeat(1 << 20)),
            "page_token",
        ),
    ];
    for (name, size, page_token, field) in cases {
        let err = client
            .list_instances(request(size, &page_token))
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{name}: {}",
            err.message()
        );
        assert!(err.message().len() < 300, "{name}: a long message");
    }
    // The real token still works, and resumes after the first machine.
    let rest = client.list_instances(request(0, &token)).await.unwrap();
    let ids: Vec<String> = rest
        .into_inner()
        .machines
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec!["web-1", "web-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_every_page_and_the_largest_page_fits_the_response_cap() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    let machines = (0..MACHINES)
        .map(|i| machine(&format!("m-{i:05}"), "big", 8080))
        .collect();
    upsert_all(&mut client, machines).await;

    let out = common::cli_ok(&["instances", "--server", agent.host_port(), "big", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = doc["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..MACHINES).map(|i| format!("m-{i:05}")).collect();
    assert_eq!(ids, expected);

    // 1000 records near the 4 KiB limit: one full page is about 4 MiB, under the 8 MiB cap.
    let fat: Vec<Machine> = (0..BATCH)
        .map(|i| {
            let mut m = machine(&format!("f-{i:04}"), "fat", 8080);
            m.metadata = (0..4).map(|k| (format!("k{k}"), "v".repeat(990))).collect();
            m
        })
        .collect();
    upsert_all(&mut client, fat).await;
    let mut big_client = client.max_decoding_message_size(patina_region::MAX_MESSAGE_BYTES);
    let page = big_client
        .list_instances(ListInstancesRequest {
            app: "fat".into(),
            include_all: false,
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.machines.len(), BATCH);
    assert!(page.next_page_token.is_empty());
}
