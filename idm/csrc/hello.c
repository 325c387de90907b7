/*
 * The hello exchange: the first message on every channel. The zone offers a version range and
 * the largest payload it accepts, plus the digest of the call table it was built from; the host
 * picks the highest common version and the smaller payload limit, or refuses with
 * IDM_ST_BAD_VERSION / IDM_ST_BAD_TABLE. Both sides then enforce the agreed limit.
 */
#include "idm.h"

#include <errno.h>

static uint32_t min_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }

static int refusal(int32_t status)
{
    return status == IDM_ST_BAD_TABLE ? -ENOMSG : -EPROTONOSUPPORT;
}

int idm_hello_client(struct idm_endpoint *ep, uint32_t max_payload, uint64_t table_digest,
                     uint16_t *version, uint32_t *max_payload_out, int timeout_ms)
{
    struct idm_hello offer = {IDM_VERSION_MIN, IDM_VERSION_MAX, max_payload, table_digest};
    struct idm_hello answer;
    struct idm_hdr h;
    int64_t n;
    int rc;

    idm_hdr_init(&h, IDM_OP_HELLO, 0, 0, sizeof(offer), IDM_ST_OK);
    rc = idm_send(ep, &h, &offer, sizeof(offer), timeout_ms);
    if (rc)
        return rc;
    n = idm_recv_hdr(ep, &h, timeout_ms);
    if (n < 0)
        return (int)n;
    if (h.opcode != IDM_OP_HELLO || !(h.flags & IDM_F_REPLY) || n != sizeof(answer))
        return -EPROTO;
    rc = idm_recv_payload(ep, &answer, sizeof(answer), timeout_ms);
    if (rc)
        return rc;
    if (h.status != IDM_ST_OK)
        return refusal(h.status);
    if (answer.version_max < IDM_VERSION_MIN || answer.version_max > IDM_VERSION_MAX ||
        answer.max_payload == 0)
        return -EPROTO;
    ep->max_payload = min_u32(min_u32(answer.max_payload, max_payload), IDM_MAX_PAYLOAD);
    *version = answer.version_max;
    *max_payload_out = ep->max_payload;
    return 0;
}

int idm_hello_server(struct idm_endpoint *ep, uint32_t max_payload, uint64_t table_digest,
                     uint16_t *version, int timeout_ms)
{
    struct idm_hello offer, answer = {0, 0, 0, table_digest};
    struct idm_hdr h;
    int64_t n;
    int rc, status = IDM_ST_OK;

    n = idm_recv_hdr(ep, &h, timeout_ms);
    if (n < 0)
        return (int)n;
    if (h.opcode != IDM_OP_HELLO || (h.flags & IDM_F_REPLY) || n != sizeof(offer))
        return -EPROTO;
    rc = idm_recv_payload(ep, &offer, sizeof(offer), timeout_ms);
    if (rc)
        return rc;
    if (offer.version_min > IDM_VERSION_MAX || offer.version_max < IDM_VERSION_MIN ||
        offer.version_min > offer.version_max || offer.max_payload == 0)
        status = IDM_ST_BAD_VERSION;
    else if (offer.table_digest != table_digest)
        status = IDM_ST_BAD_TABLE;
    else {
        answer.version_min = IDM_VERSION_MIN;
        answer.version_max = offer.version_max < IDM_VERSION_MAX ? offer.version_max : IDM_VERSION_MAX;
        answer.max_payload = min_u32(min_u32(offer.max_payload, max_payload), IDM_MAX_PAYLOAD);
    }
    idm_hdr_init(&h, IDM_OP_HELLO, IDM_F_REPLY, h.seq, sizeof(answer), status);
    rc = idm_send(ep, &h, &answer, sizeof(answer), timeout_ms);
    if (rc)
        return rc;
    if (status != IDM_ST_OK)
        return refusal(status);
    ep->max_payload = answer.max_payload;
    *version = answer.version_max;
    return 0;
}
