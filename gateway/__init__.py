"""The platform's HTTP/websocket edge: `gateway.app` (routes, tenancy, limits), `gateway.jobs` and `gateway.events`
(job states and progress subscribers), `gateway.publisher` (requests and cancellations onto Kafka)."""
