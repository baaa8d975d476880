"""hvdcomp.costs: the step-time model's formulas against hand-computed cases."""
from __future__ import annotations

import dataclasses

import pytest

from hvdcomp import costs
from hvdcomp.costs import Chain, Collective, Compute, Link

COMPUTE = Compute(forward_s=0.1, backward_s=0.2, update_s=0.05)


def unshaped(alpha=0.001, beta=1e-6, n=2) -> Link:
    return Link({op: costs.CollectiveFit(alpha, beta) for op in costs.OPS}, n)


def test_bytes_per_rank_are_gloos_algorithms():
    assert [costs.bytes_per_rank(op, 1000, 4) for op in costs.OPS] == [1500, 3000, 750, 750]
    assert costs.bytes_per_rank("allgather", 1000, 1) == 0
    with pytest.raises(ValueError, match="unknown collective 'reduce'"):
        costs.bytes_per_rank("reduce", 1, 2)


def test_one_shared_bucket_costs_n_over_rate_per_byte_and_its_burst_is_free_once():
    link = Link.shared_bucket(rate_bytes_per_s=1e6, burst_bytes=1e5, nranks=2, alpha_s=0.001)
    assert link.credit_cap_s == pytest.approx(0.1)
    # 2 ranks, allreduce of 1 MB: each rank sends 1 MB, both through the bucket: 2 s.
    assert link.transfer_s("allreduce", 1e6) == pytest.approx(2.0)
    assert link.collective_s("allreduce", 1e6) == pytest.approx(2.001)
    assert link.collective_s("allreduce", 1e6, credit_s=0.1) == pytest.approx(1.901)
    # 4 ranks: beta = 4 / R; allgather of 1 kB sends 3 kB per rank, 12 kB in all.
    four = Link.shared_bucket(1e6, 0, 4)
    assert four.transfer_s("allgather", 1000) == pytest.approx(0.012)


def test_full_duplex_links_run_a_rings_hops_at_once_and_charge_broadcast_its_rounds():
    link = Link.full_duplex(rate_bytes_per_s=1e6, nranks=8, alpha_s=0.0)
    assert link.transfer_s("allreduce", 8e6) == pytest.approx(14.0)  # 2 * 7/8 * 8 MB at 1 MB/s
    assert link.transfer_s("broadcast", 8e6) == pytest.approx(24.0)  # 3 rounds of 8 MB
    assert Link.full_duplex(1e6, 1).collective_s("allreduce", 1e9) == 0.0


def test_link_from_a_sweeps_fits_takes_the_bursts_seconds_as_credit():
    fits = {"allreduce": {"alpha_s": 0.002, "beta_s_per_byte": 3.2e-7, "free_bytes_per_rank": 131072.0},
            "allgather": {"alpha_s": None}}
    link = Link.from_fits(fits, 2)
    assert set(link.fits) == {"allreduce"}
    assert link.credit_cap_s == pytest.approx(3.2e-7 * 131072)
    assert Link.from_fits(fits, 2, credit_cap_s=0.0).credit_cap_s == 0.0
    with pytest.raises(ValueError, match="no fit for 'allgather'"):
        link.transfer_s("allgather", 10)


def test_a_chain_needs_one_local_time_per_phase():
    with pytest.raises(ValueError, match="one local time per phase"):
        Chain(phases=((Collective("allgather", 8),), (Collective("allgather", 80),)), local_s=(0.1,))


def test_one_dense_chain_at_the_end_of_backward():
    # issued at F + B + encode = 0.31; 1 s of bytes + 1 ms; decode 20 ms; update 50 ms.
    chain = Chain(phases=((Collective("allreduce", 1e6),),), local_s=(0.01,), decode_s=0.02, ready_s=0.2)
    link = unshaped()
    got = costs.predict_step(COMPUTE, [chain], link)
    assert got.step_s == pytest.approx(0.31 + 1.001 + 0.02 + 0.05)
    assert got.network_s == pytest.approx(1.001)
    assert got.local_s == pytest.approx(0.03)
    assert got.exposed_s == pytest.approx(got.step_s - 0.35)
    assert costs.bound_s(COMPUTE, [chain], link) == pytest.approx(0.35 + 1.0)
    assert costs.chain_s(chain, link) == pytest.approx(0.01 + 1.001 + 0.02)


def test_the_bucket_refills_while_the_link_is_idle():
    # Idle since the previous step's update began (-0.05) until 0.31: 0.36 s of credit of 0.5.
    chain = Chain(phases=((Collective("allreduce", 1e6),),), local_s=(0.01,), decode_s=0.02, ready_s=0.2)
    link = Link({op: costs.CollectiveFit(0.001, 1e-6) for op in costs.OPS}, 2, credit_cap_s=0.5)
    assert costs.predict_step(COMPUTE, [chain], link).step_s == pytest.approx(0.31 + 0.001 + 1.0 - 0.36 + 0.07)
    capped = Link(link.fits, 2, credit_cap_s=0.1)
    assert costs.predict_step(COMPUTE, [chain], capped).step_s == pytest.approx(0.31 + 0.001 + 0.9 + 0.07)


def test_phases_of_a_chain_follow_one_another_with_their_local_work_between():
    # sizes (8 B) then payload (1 kB) by allgather on 2 ranks, beta 1e-3 s/B, alpha 10 ms.
    chain = Chain(phases=((Collective("allgather", 8),), (Collective("allgather", 1000),)), local_s=(0.03, 0.004),
                  decode_s=0.02, ready_s=0.2)
    link = unshaped(alpha=0.01, beta=1e-3)
    start = 0.1 + 0.2 + 0.03
    sizes = start + 0.01 + 0.008
    payload = sizes + 0.004 + 0.01 + 1.0
    for driver in (costs.HOROVOD, costs.DDP):
        assert costs.predict_step(COMPUTE, [chain], link, driver).step_s == pytest.approx(payload + 0.02 + 0.05)


def test_horovod_fuses_waiting_allreduces_into_one_latency():
    # Three ready together, issued 10 ms apart (each hook's encode): the first goes alone,
    # the two that wait for it go as one.
    dense = [Chain(((Collective("allreduce", 1000),),), (0.01,), 0.0, 0.2, i) for i in range(3)]
    link = unshaped(alpha=0.1, beta=1e-6)
    # t = 0.31: chain 0 alone (0.1 + 0.001); at 0.411 chains 1 and 2 (issued 0.32, 0.33) fused.
    fused = costs.predict_step(COMPUTE, dense, link, costs.HOROVOD)
    assert fused.step_s == pytest.approx(0.31 + 0.101 + 0.102 + 0.05)
    # Without fusion (DDP's process groups take them one by one): three latencies.
    single = costs.predict_step(COMPUTE, dense, link, costs.DDP)
    assert single.step_s == pytest.approx(0.31 + 3 * 0.101 + 0.05)


def test_fused_tensors_are_copied_into_horovods_fusion_buffer_and_out():
    copying = dataclasses.replace(COMPUTE, copy_s_per_byte=1e-5)
    link = unshaped(alpha=0.1, beta=1e-6)
    # As above: chain 0 alone until 0.411, then chains 1 and 2 as one: latency, 0.02 s
    # copying their 2000 bytes in, the bytes, 0.02 s copying them out.
    dense = [Chain(((Collective("allreduce", 1000),),), (0.01,), 0.0, 0.2, i) for i in range(3)]
    assert costs.predict_step(copying, dense, link, costs.HOROVOD).step_s == pytest.approx(
        0.411 + 0.1 + 0.04 + 0.002 + 0.05)
    # One tensor alone is reduced where it lies; DDP has no fusion buffer.
    assert costs.predict_step(copying, dense[:1], link, costs.HOROVOD).step_s == pytest.approx(0.31 + 0.101 + 0.05)
    assert (costs.predict_step(copying, dense, link, costs.DDP).step_s
            == pytest.approx(costs.predict_step(COMPUTE, dense, link, costs.DDP).step_s))
    with pytest.raises(ValueError, match="copy_s_per_byte must be >= 0"):
        Compute(0.1, 0.2, 0.05, copy_s_per_byte=-1.0)


def test_fusion_buffer_copies_on_the_ranks_cores_compete_with_the_backward_pass():
    # Ready at once, issued at 0.11, 0.12, 0.13: chain 0 alone until 0.211, then chains 1
    # and 2 fused, copying from 0.311 and 0.333 (0.02 s each), done at 0.353; the backward
    # pass with the three encodes ends at 0.33.
    dense = [Chain(((Collective("allreduce", 1000),),), (0.01,), 0.0, 0.0, i) for i in range(3)]
    one_core = Compute(0.1, 0.2, 0.05, cores=1, copy_s_per_byte=1e-5)
    wire = unshaped(alpha=0.1, beta=1e-6)
    assert costs.predict_step(one_core, dense, wire).step_s == pytest.approx(0.353 + 0.05)
    # On the ranks' cores one core does the backward pass, the byte terms (0.003 s) and the
    # copies (0.04 s), the last piece from 0.333: all of it by 0.373.
    on_cores = dataclasses.replace(wire, on_rank_cores=True)
    assert costs.predict_step(one_core, dense, on_cores).step_s == pytest.approx(0.33 + 0.003 + 0.04 + 0.05)


def test_ddp_runs_later_phases_in_callbacks_during_the_backward_pass():
    # A two-phase chain ready early (10 ms into backward): DDP finishes it during the
    # backward pass; Horovod issues its second phase only in synchronize().
    chain = Chain(phases=((Collective("allgather", 8),), (Collective("allgather", 8),)), local_s=(0.0, 0.0),
                  decode_s=0.0, ready_s=0.01)
    link = unshaped(alpha=0.05, beta=0.0)
    assert costs.predict_step(COMPUTE, [chain], link, costs.DDP).step_s == pytest.approx(0.35)
    # Horovod: phase 1 issued at the end of backward (0.3), done at 0.35; then the update.
    assert costs.predict_step(COMPUTE, [chain], link, costs.HOROVOD).step_s == pytest.approx(0.3 + 0.05 + 0.05)


def test_one_rank_exchanges_nothing():
    chain = Chain(((Collective("allreduce", 1e9),),), (0.01,), 0.02, 0.2)
    link = Link.shared_bucket(1e6, 0, 1, alpha_s=1.0)
    assert costs.predict_step(COMPUTE, [chain], link).step_s == pytest.approx(0.35 + 0.03)


def test_control_traffic_while_idle_slows_the_buckets_refill():
    # Idle from -0.05 to 0.31 (0.36 s); a quarter of the rate taken by negotiation: 0.27 s of credit.
    chain = Chain(phases=((Collective("allreduce", 1e6),),), local_s=(0.01,), decode_s=0.02, ready_s=0.2)
    link = Link({op: costs.CollectiveFit(0.001, 1e-6) for op in costs.OPS}, 2, credit_cap_s=0.5, idle_share=0.25)
    assert costs.predict_step(COMPUTE, [chain], link).step_s == pytest.approx(0.31 + 0.001 + 1.0 - 0.27 + 0.07)


def test_hop_latencies_count_each_algorithms_message_steps():
    assert costs.hop_latencies(1e-5, 8) == pytest.approx(
        {"allreduce": 14e-5, "allgather": 7e-5, "alltoall": 7e-5, "broadcast": 3e-5})
    assert costs.hop_latencies(1e-5, 1) == dict.fromkeys(costs.OPS, 0.0)


def test_one_core_finishes_work_in_busy_periods_from_each_arrival():
    # Work arriving while the core is busy queues behind it; idle gaps are not filled.
    assert costs.one_core_finish_s([(0.0, 1.0), (0.5, 1.0)]) == pytest.approx(2.0)
    assert costs.one_core_finish_s([(0.0, 1.0), (3.0, 0.5)]) == pytest.approx(3.5)
    assert costs.one_core_finish_s([(2.0, 0.5), (0.0, 1.0), (2.2, 0.5)]) == pytest.approx(3.0)
    assert costs.one_core_finish_s([]) == 0.0


def test_ddp_callbacks_take_the_training_threads_core_when_a_rank_has_one():
    # A chain ready at the start of backward, its decode (0.1 s) due long before the
    # backward pass ends: with a core to spare the callback runs beside the backward
    # pass; on one core the backward pass and the decode add up.
    chain = Chain(phases=((Collective("allgather", 8),),), local_s=(0.0,), decode_s=0.1, ready_s=0.0)
    link = unshaped(alpha=0.01, beta=0.0)
    spare = costs.predict_step(COMPUTE, [chain], link, costs.DDP)
    assert spare.step_s == pytest.approx(0.35)
    one = Compute(COMPUTE.forward_s, COMPUTE.backward_s, COMPUTE.update_s, cores=1)
    assert costs.predict_step(one, [chain], link, costs.DDP).step_s == pytest.approx(0.45)
    # Horovod decodes on the training thread in synchronize() either way.
    assert costs.predict_step(one, [chain], link).step_s == costs.predict_step(COMPUTE, [chain], link).step_s
    with pytest.raises(ValueError, match="cores must be > 0"):
        Compute(0.1, 0.2, 0.05, cores=0)


def test_a_ddp_callback_shares_one_core_with_the_backward_pass_and_issues_its_phase_later():
    # Ready at the start of backward (0.1 s): phase 0 (10 ms) is done at 0.11; its
    # callback packs for 0.1 s, then issues phase 1 (0.01 + 0.24 s on the wire).
    chain = Chain(phases=((Collective("allgather", 0),), (Collective("allgather", 240_000),)),
                  local_s=(0.0, 0.1), ready_s=0.0)
    link = unshaped(alpha=0.01, beta=1e-6)
    # With a core to spare: phase 1 issued at 0.21, done at 0.46; then the update.
    assert costs.predict_step(COMPUTE, [chain], link, costs.DDP).step_s == pytest.approx(0.46 + 0.05)
    # On one core the packing runs at half speed beside the backward pass (0.11 to 0.31),
    # so phase 1 is done at 0.56; the backward pass, slowed as long, ends at 0.40.
    one = Compute(COMPUTE.forward_s, COMPUTE.backward_s, COMPUTE.update_s, cores=1)
    assert costs.predict_step(one, [chain], link, costs.DDP).step_s == pytest.approx(0.56 + 0.05)
    # On 1.5 cores the two run at 0.75 each: packing done at 0.11 + 0.1 / 0.75.
    more = Compute(COMPUTE.forward_s, COMPUTE.backward_s, COMPUTE.update_s, cores=1.5)
    assert costs.predict_step(more, [chain], link, costs.DDP).step_s == pytest.approx(0.11 + 0.1 / 0.75 + 0.25 + 0.05)
    # A short backward pass the callback outlasts: the backward's 0.2 s share the core from
    # 0.11 (0.01 done alone after the forward) for 0.19 s of work, the packing 0.1 s: both
    # at half speed until the packing ends at 0.31, the backward alone until 0.40.
    chain2 = dataclasses.replace(chain, phases=(chain.phases[0], (Collective("allgather", 0),)))
    assert costs.predict_step(one, [chain2], link, costs.DDP).step_s == pytest.approx(0.40 + 0.05)
    # Horovod packs on the training thread in synchronize() either way.
    assert costs.predict_step(one, [chain], link).step_s == costs.predict_step(COMPUTE, [chain], link).step_s


def test_work_ending_with_a_collective_on_the_shared_core_still_goes_on():
    # Chain a's collective (issued at 0.1, 0.1 s of latency) and the backward pass's reaching
    # chain b (0.1 s into it) both end at 0.2: b's phase is issued then and done at 0.3, and
    # the backward pass ends at 0.3.
    a = Chain(phases=((Collective("allgather", 0),),), local_s=(0.0,), ready_s=0.0)
    b = Chain(phases=((Collective("allgather", 0),),), local_s=(0.0,), ready_s=0.1)
    one = Compute(COMPUTE.forward_s, COMPUTE.backward_s, COMPUTE.update_s, cores=1)
    step = costs.predict_step(one, [a, b], unshaped(alpha=0.1, beta=0.0), costs.DDP)
    assert step.step_s == pytest.approx(0.3 + 0.05)
    assert step.network_s == pytest.approx(0.2)


def test_collectives_on_the_ranks_cores_compete_with_the_backward_pass_for_their_bytes():
    # A chain ready at the start of backward (F = 0.1), its allreduce issued at once: 10 ms
    # of latency, then 0.1 s of byte term, done at 0.21, long before backward ends at 0.3.
    chain = Chain(phases=((Collective("allreduce", 1e5),),), local_s=(0.0,), ready_s=0.0)
    wire = unshaped(alpha=0.01, beta=1e-6)
    copies = Link(wire.fits, wire.nranks, on_rank_cores=True)
    one = Compute(COMPUTE.forward_s, COMPUTE.backward_s, COMPUTE.update_s, cores=1)
    for driver in (costs.HOROVOD, costs.DDP):
        # On a wire the transfer overlaps the backward pass.
        assert costs.predict_step(one, [chain], wire, driver).step_s == pytest.approx(0.35)
        # As the ranks' own copies on one core, its byte term adds to it; the latency does not.
        assert costs.predict_step(one, [chain], copies, driver).step_s == pytest.approx(0.45)
        # With a core to spare the copies run beside the backward pass.
        assert costs.predict_step(COMPUTE, [chain], copies, driver).step_s == pytest.approx(0.35)


def test_a_link_prices_an_fp16_sum_by_its_own_fit_where_it_has_one():
    fits = {op: costs.CollectiveFit(0.001, 1e-6) for op in costs.OPS}
    fp16 = Collective("allreduce", 1e6, "float16")
    assert costs.fit_key("allreduce", "float16") == "allreduce_float16"
    assert costs.fit_key("allgather", "float16") == "allgather"  # a gather moves bytes, sums nothing
    assert costs.op_and_dtype("allreduce_float16") == ("allreduce", "float16")
    assert costs.op_and_dtype("broadcast") == ("broadcast", "float32")
    plain = Link(fits, 2)
    # No fp16 fit: its bytes cost what float32's do.
    assert plain.transfer_s("allreduce", 1e6, "float16") == pytest.approx(1.0)
    link = Link({**fits, "allreduce_float16": costs.CollectiveFit(0.003, 2.5e-6)}, 2)
    assert link.transfer_s("allreduce", 1e6, "float16") == pytest.approx(2.5)
    assert link.transfer_s("allreduce", 1e6) == pytest.approx(1.0)
    assert link.collective_s("allreduce", 1e6, dtype="float16") == pytest.approx(2.503)
    chain = Chain(((fp16,),), (0.01,), 0.02, 0.2)
    assert costs.predict_step(COMPUTE, [chain], link).step_s == pytest.approx(0.31 + 2.503 + 0.02 + 0.05)
    assert costs.bound_s(COMPUTE, [chain], link) == pytest.approx(0.35 + 2.5)
    assert costs.chain_s(chain, link) == pytest.approx(0.01 + 2.503 + 0.02)


def test_horovod_fuses_only_allreduces_of_one_dtype():
    # As in the fusion test above, chains 1 and 2 wait together; of another dtype they go apart.
    dense = [Chain(((Collective("allreduce", 1000, dtype),),), (0.01,), 0.0, 0.2, i)
             for i, dtype in enumerate(["float32", "float32", "float16"])]
    link = unshaped(alpha=0.1, beta=1e-6)
    got = costs.predict_step(COMPUTE, dense, link, costs.HOROVOD)
    assert got.step_s == pytest.approx(0.31 + 3 * 0.101 + 0.05)


def test_a_collective_during_the_backward_pass_waits_out_its_latency_under_load():
    # F 0, B 0.1, one core per rank: the training thread computes until 0.1. The allreduce
    # issued at 0.095 takes 1 ms alone but 20 ms under load; by 0.1 it has done 5/20 of
    # that, and the rest at its idle pace: 0.75 ms after the backward pass.
    compute = Compute(forward_s=0.0, backward_s=0.1, update_s=0.0, cores=1.0)
    link = dataclasses.replace(unshaped(beta=0.0), loaded_latency_s={"allreduce": 0.02})
    late = Chain(phases=((Collective("allreduce", 4),),), local_s=(0.0,), ready_s=0.095)
    assert costs.predict_step(compute, [late], link).step_s == pytest.approx(0.1 + 0.001 * 0.75)
    assert costs.predict_step(compute, [late], unshaped(beta=0.0)).step_s == pytest.approx(0.1)
    # With a core for its threads (cores >= 2) a collective keeps its idle latency.
    two_cores = dataclasses.replace(compute, cores=2.0)
    assert costs.predict_step(two_cores, [late], link).step_s == pytest.approx(0.1)
    # Issued early enough, it ends under load (at 0.07) and hides behind the pass.
    early = dataclasses.replace(late, ready_s=0.05)
    assert costs.predict_step(compute, [early], link).step_s == pytest.approx(0.1)


def test_each_op_waits_out_its_own_latency_under_load():
    # B 0.03: an allgather issued at 0 takes 40 ms under load, 3/4 of it done by 0.03.
    compute = Compute(forward_s=0.0, backward_s=0.03, update_s=0.0, cores=0.5)
    link = dataclasses.replace(unshaped(beta=0.0), loaded_latency_s={"allreduce": 0.02, "allgather": 0.04})
    gather = Chain(phases=((Collective("allgather", 4),),), local_s=(0.0,), ready_s=0.0)
    assert link.loaded_s("allgather") == 0.04 and link.loaded_s("broadcast") == 0.0
    assert costs.predict_step(compute, [gather], link).step_s == pytest.approx(0.03 + 0.001 * 0.25)
    reduce = Chain(phases=((Collective("allreduce", 4),),), local_s=(0.0,), ready_s=0.0)
    assert costs.predict_step(compute, [reduce], link).step_s == pytest.approx(0.03)  # done at 0.02
    assert dataclasses.replace(link, nranks=1).loaded_s("allgather") == 0.0


def test_the_bucket_refills_while_a_collective_waits_under_load():
    # 10 ms of bytes, 10 ms of credit at most, none at 0. Alone from 0 it would pay all its
    # bytes; under load (30 ms) it waits until 0.02, when the bucket holds 10 ms of credit
    # again, and then its bytes pass at once: the wire was never busy.
    compute = Compute(forward_s=0.0, backward_s=0.1, update_s=0.0, cores=1.0)
    link = Link({op: costs.CollectiveFit(0.0, 1e-5) for op in costs.OPS}, 2, credit_cap_s=0.01,
                loaded_latency_s={"allreduce": 0.03})
    chain = Chain(phases=((Collective("allreduce", 1000),),), local_s=(0.0,), ready_s=0.0)
    assert costs.predict_step(compute, [chain], link).network_s == pytest.approx(0.0)
    idle = dataclasses.replace(link, loaded_latency_s={})
    assert costs.predict_step(compute, [chain], idle).network_s == pytest.approx(0.01)
