//! Plain WireGuard devices registered by an admin, and their wg-quick configs.

use std::time::Duration;

use meshd_protocol::MapMessage;
use meshd_protocol::api::PresharedKeys;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, Coord, TestDb, error_code, key};

both_backends! {
    register_device_and_download_config => register_device_and_download_config;
    preshared_keys_per_pair => preshared_keys_per_pair;
    config_as_qr_code => config_as_qr_code;
}

async fn register_device_and_download_config(backend: Backend) {
    let db = TestDb::new(&backend).await;
    // Without the gateway, peers keep their own reported endpoints (the gateway case is in gateway.rs and the lab).
    let c = Coord::start_with(&db, |config| config.gateway = None).await;
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "server").await;
    let b = c.join(&token, &key(2), "laptop").await;
    let r = c
        .client
        .put(c.url("/api/v1/node/endpoints"))
        .bearer_auth(&a.credential)
        .json(&json!({"endpoints": ["198.18.0.10:51820", "198.18.5.5:40000"]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 204);
    let mut sb = c.stream(&b.credential, None, None).await;
    let _ = sb.next(Duration::from_secs(5)).await;

    let phone_key = key(77);
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "alice-phone", "public_key": phone_key.to_string(), "tags": ["phone"]})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let phone: Value = r.json().await.expect("json");
    assert_eq!(phone["kind"], "wireguard");
    assert_eq!(phone["ip"], "10.77.0.4");
    assert_eq!(phone["endpoints"], json!([]));
    let phone_id = phone["id"].as_i64().expect("id");

    // Meshd nodes see it as a peer.
    let m = sb
        .until(Duration::from_secs(5), |m| matches!(m, MapMessage::PeerAdded { .. }))
        .await;
    assert!(
        matches!(&m, MapMessage::PeerAdded { peer, .. } if peer.id == phone_id && peer.public_key == *phone_key && peer.endpoints.is_empty())
    );

    // Conflicts and validation.
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "other", "public_key": phone_key.to_string()})),
        )
        .await;
    assert_eq!(error_code(r).await, (409, "conflict".into()));
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "server", "public_key": key(78).to_string()})),
        )
        .await;
    assert_eq!(error_code(r).await, (409, "conflict".into()));
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "Bad Name", "public_key": key(78).to_string()})),
        )
        .await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "ok", "public_key": "short"})),
        )
        .await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));

    // The config.
    let r = c
        .admin_send(Method::GET, &format!("/api/v1/nodes/{phone_id}/wireguard-config"), None)
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/plain")
    );
    let text = r.text().await.expect("text");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines[0], "[Interface]");
    assert!(lines.contains(&"Address = 10.77.0.4/32"));
    let private = lines
        .iter()
        .find(|l| l.starts_with("PrivateKey = "))
        .expect("PrivateKey line");
    assert_eq!(
        *private,
        format!("PrivateKey = {}", meshd_coordinator::wgconfig::PRIVATE_KEY_PLACEHOLDER)
    );
    let peers: Vec<&str> = text.split("[Peer]").skip(1).collect();
    assert_eq!(peers.len(), 2, "one peer per meshd node");
    let server = peers
        .iter()
        .find(|p| p.contains(&key(1).to_string()))
        .expect("server peer");
    assert!(server.contains("AllowedIPs = 10.77.0.2/32"));
    assert!(
        server.contains("Endpoint = 198.18.0.10:51820"),
        "first reported endpoint"
    );
    assert!(!server.contains("198.18.5.5"));
    assert!(server.contains("PersistentKeepalive = 25"));
    let laptop = peers
        .iter()
        .find(|p| p.contains(&key(2).to_string()))
        .expect("laptop peer");
    assert!(laptop.contains("AllowedIPs = 10.77.0.3/32"));
    assert!(!laptop.contains("Endpoint"), "no endpoint reported: no Endpoint line");

    let r = c
        .admin_send(Method::GET, "/api/v1/nodes/9999/wireguard-config", None)
        .await;
    assert_eq!(error_code(r).await, (404, "not_found".into()));
    let r = c
        .client
        .get(c.url(&format!("/api/v1/nodes/{phone_id}/wireguard-config")))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);

    // The device's key can later join with meshd: same node and address.
    let j = c.join(&token, &phone_key, "phone").await;
    assert_eq!((j.node_id, j.ip.to_string().as_str()), (phone_id, "10.77.0.4"));
    c.stop().await;
}

async fn preshared_keys(c: &Coord, credential: &str) -> PresharedKeys {
    let r = c
        .client
        .get(c.url(meshd_protocol::paths::PRESHARED_KEYS))
        .bearer_auth(credential)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    r.json().await.expect("preshared keys")
}

async fn preshared_keys_per_pair(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({"reusable": true})).await;
    let a = c.join(&token, &key(1), "server").await;
    let b = c.join(&token, &key(2), "laptop").await;
    let path = meshd_protocol::paths::PRESHARED_KEYS;

    // Only a node credential opens it: none, a damaged one, an admin API key are all refused.
    let r = c.client.get(c.url(path)).send().await.expect("send");
    assert_eq!(error_code(r).await, (401, "unauthorized".into()));
    let forged = format!("{}x", a.credential);
    let r = c
        .client
        .get(c.url(path))
        .bearer_auth(&forged)
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (401, "unauthorized".into()));
    let r = c.admin(Method::GET, path).send().await.expect("send");
    assert_eq!(error_code(r).await, (401, "unauthorized".into()));

    // Agents alone use no preshared key.
    assert!(preshared_keys(&c, &a.credential).await.keys.is_empty());

    // A device gets one by default; one registered without gets none.
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "phone", "public_key": key(77).to_string()})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let phone: Value = r.json().await.expect("json");
    assert_eq!(phone["preshared_key"], true);
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "tablet", "public_key": key(78).to_string(), "preshared_key": false})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let tablet: Value = r.json().await.expect("json");
    assert_eq!(tablet["preshared_key"], false);

    let ka = preshared_keys(&c, &a.credential).await.keys;
    let kb = preshared_keys(&c, &b.credential).await.keys;
    assert_eq!(ka.iter().map(|k| k.peer).collect::<Vec<_>>(), vec![*key(77)]);
    assert_eq!(kb.iter().map(|k| k.peer).collect::<Vec<_>>(), vec![*key(77)]);
    assert_ne!(ka[0].preshared_key, kb[0].preshared_key, "each pair has its own key");
    // Stable across requests (one secret, created once).
    assert_eq!(preshared_keys(&c, &a.credential).await.keys, ka);

    // The phone's config carries the same key for each pair as the agent at the other end fetched.
    let phone_id = phone["id"].as_i64().expect("id");
    let text = c
        .admin_send(Method::GET, &format!("/api/v1/nodes/{phone_id}/wireguard-config"), None)
        .await
        .text()
        .await
        .expect("text");
    for (agent, keys) in [(key(1), &ka), (key(2), &kb)] {
        let section = text
            .split("[Peer]")
            .find(|p| p.contains(&agent.to_string()))
            .expect("agent peer");
        assert!(section.contains(&format!("PresharedKey = {}\n", keys[0].preshared_key.to_base64())));
    }
    let tablet_id = tablet["id"].as_i64().expect("id");
    let text = c
        .admin_send(
            Method::GET,
            &format!("/api/v1/nodes/{tablet_id}/wireguard-config"),
            None,
        )
        .await
        .text()
        .await
        .expect("text");
    assert!(!text.contains("PresharedKey"));
    c.stop().await;
}

async fn config_as_qr_code(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let c = Coord::start(&db).await;
    let token = c.token(json!({})).await;
    c.join(&token, &key(1), "server").await;
    let r = c
        .admin_send(
            Method::POST,
            "/api/v1/nodes",
            Some(json!({"name": "phone", "public_key": key(77).to_string()})),
        )
        .await;
    let phone: Value = r.json().await.expect("json");
    let path = format!("/api/v1/nodes/{}/wireguard-config", phone["id"]);
    let conf = c.admin_send(Method::GET, &path, None).await.text().await.expect("text");
    let same = c
        .admin_send(Method::GET, &format!("{path}?format=conf"), None)
        .await
        .text()
        .await
        .expect("text");
    assert_eq!(conf, same);

    let r = c.admin_send(Method::GET, &format!("{path}?format=png"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = r.bytes().await.expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let mut reader = ::png::Decoder::new(std::io::Cursor::new(png.to_vec()))
        .read_info()
        .expect("png header");
    let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut pixels).expect("png frame");
    let width = info.width as usize;
    let mut image =
        rqrr::PreparedImage::prepare_from_greyscale(width, info.height as usize, |x, y| pixels[y * width + x]);
    let grids = image.detect_grids();
    assert_eq!(grids.len(), 1);
    assert_eq!(
        grids[0].decode().expect("decodes").1,
        conf,
        "the QR code holds the config"
    );

    let r = c.admin_send(Method::GET, &format!("{path}?format=svg"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    let svg = r.text().await.expect("svg");
    assert!(svg.starts_with("<?xml") && svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));

    let r = c.admin_send(Method::GET, &format!("{path}?format=jpeg"), None).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("conf, png, svg")
    );

    for format in ["png", "svg"] {
        let r = c
            .client
            .get(c.url(&format!("{path}?format={format}")))
            .send()
            .await
            .expect("send");
        assert_eq!(error_code(r).await, (401, "unauthorized".into()));
    }
    c.stop().await;
}
