"""qie's EP regions: chains of QDQ conv, BatchNormalization and activation units claimed as one fused node.

A small CNN (strided conv, depthwise conv, pointwise conv, BatchNormalization, Relu / HardSwish / SiLU / LeakyRelu
/ Clip) is quantized by ``onnxruntime.quantization.quantize_static`` as a user would (QDQ, per-channel or per-tensor,
u8 / s8 activations). SiLU as Sigmoid and Mul (a binary unit of x and a table of x) is folded into one table.
With ``qie_ep.register(so)`` its regions must run on qie and give ORT's own results: conv units
are QLinearConv's arithmetic (ORT's fused kernels at EXTENDED / ALL), tables are the float ops of the QDQ graph
evaluated once per input code. Sigmoid uses libm's exp where ORT uses MLAS's approximation: a table entry may then
differ by one step; the bound is asserted and the count printed. Regions must stop at forks and graph outputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qie_ep
from helpers import COMPARE_BUILTIN, OPT_LEVELS
from qie_ep.session import options, session

needs_ep = pytest.mark.skipif(not qie_ep.ep_available(), reason="no plugin EP here (ORT < 1.27 or no libqie_ep.so)")


def cnn(rng, act="HardSwish", c=8, extra_output=False):
    """Float CNN: conv s2 -> BN -> act -> depthwise -> BN -> act -> pointwise -> act -> conv -> act."""
    inits, nodes = [], []

    def conv(x, cin, cout, k, name, stride=1, group=1):
        w = (rng.normal(size=(cout, cin // group, k, k)) * 0.3).astype(np.float32)
        b = (rng.normal(size=cout) * 0.1).astype(np.float32)
        inits.extend([nh.from_array(w, name + "_w"), nh.from_array(b, name + "_b")])
        nodes.append(h.make_node("Conv", [x, name + "_w", name + "_b"], [name], pads=[k // 2] * 4,
                                 strides=[stride] * 2, group=group))
        return name

    def bn(x, ch, name):
        vals = [rng.uniform(0.5, 1.5, ch), rng.normal(size=ch) * 0.1, rng.normal(size=ch) * 0.1, rng.uniform(0.5, 2, ch)]
        names = [f"{name}_{p}" for p in ("s", "b", "m", "v")]
        inits.extend(nh.from_array(v.astype(np.float32), n) for v, n in zip(vals, names))
        nodes.append(h.make_node("BatchNormalization", [x, *names], [name], epsilon=1e-5))
        return name

    def activation(x, name):
        if act == "SiLU":
            nodes.append(h.make_node("Sigmoid", [x], [name + "_s"]))
            nodes.append(h.make_node("Mul", [x, name + "_s"], [name]))
        elif act == "Clip":
            inits.extend([nh.from_array(np.array(0, np.float32), name + "_lo"),
                          nh.from_array(np.array(6, np.float32), name + "_hi")])
            nodes.append(h.make_node("Clip", [x, name + "_lo", name + "_hi"], [name]))
        elif act == "LeakyRelu":
            nodes.append(h.make_node("LeakyRelu", [x], [name], alpha=0.1))
        else:
            nodes.append(h.make_node(act, [x], [name]))
        return name

    x = activation(bn(conv("x", 3, c, 3, "c1", 2), c, "bn1"), "a1")
    x = activation(bn(conv(x, c, c, 3, "c2", 1, group=c), c, "bn2"), "a2")
    x = activation(conv(x, c, 2 * c, 1, "c3"), "a3")
    x = activation(conv(x, 2 * c, c, 3, "c4"), "y")
    outputs = [h.make_tensor_value_info("y", T.FLOAT, None)]
    if extra_output:
        outputs.append(h.make_tensor_value_info("a2", T.FLOAT, None))
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])], outputs, inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def quantize(model, rng, per_channel, activation_signed, tmp_path, shape=(1, 3, 16, 16), op_types=None,
             inputs=("x",)):
    """``model`` through ``quantize_static`` as a user would (QDQ, s8 weights) on six random batches of ``shape`` per
    input; ``op_types``: ORT's default set, or e.g. qie's kernels' op types only (MatMul, Conv, Gemm)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{k: rng.normal(size=shape).astype(np.float32) for k in inputs} for _ in range(6)])

        def get_next(self):
            return next(self.data, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8 if activation_signed else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=op_types)
    return onnx.load(dst)


QIE_QUANTIZE_OPS = ["MatMul", "Conv", "Gemm"]  # `qie quantize --op-types MatMul Conv Gemm` (its default before session 37)


def run(model, feeds, level, qie, threads=1):
    so = options(qie=qie, level=level, threads=threads)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    s = session(model, so)
    qie_nodes = sum(len(a.get_nodes()) for a in s.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME)
    return s.run(None, feeds), qie_nodes


def steps(model):
    """The output quantization step of the model's last QuantizeLinear (its float outputs are multiples of it)."""
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][-1]
    return float(nh.to_array(next(i for i in model.graph.initializer if i.name == q.input[1])))


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("act", ["HardSwish", "Relu", "Clip", "LeakyRelu", "Sigmoid", "SiLU"])
@pytest.mark.parametrize("per_channel,signed", [(True, False), (False, True)])
def test_cnn_region_equals_ort(tmp_path, level, act, per_channel, signed):
    rng = np.random.default_rng(7)
    model = quantize(cnn(rng, act), rng, per_channel, signed, tmp_path)
    qie_ep.reset_stats()
    for shape in ((1, 3, 16, 16), (2, 3, 9, 13), (1, 3, 1, 1)):  # changing batch and spatial dims
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), claimed = run(model, feeds, level, qie=True)
        (want,), _ = run(model, feeds, level, qie=False)
        # Every conv, BN and activation unit of the chain is claimed: the input's QuantizeLinear, the output's
        # DequantizeLinear and the last activation stay with ORT.
        assert claimed >= len(model.graph.node) - 3, (claimed, len(model.graph.node))
        diff = np.abs(got - want)
        if act in ("Sigmoid", "SiLU"):  # libm exp vs MLAS's logistic: one step at most
            assert diff.max() <= steps(model) * 1.0001, (diff.max(), steps(model))
            print(f"{act} {level}: {int((diff > 0).sum())} of {diff.size} elements one step apart")
        elif COMPARE_BUILTIN:
            assert diff.max() == 0, (diff.max(), int((diff > 0).sum()), level)
        else:
            assert_equals_ort(got, want, level)
    assert qie_ep.stats()[(qie_ep.EP_NAME, "QDQ region")], qie_ep.stats()


@needs_ep
def test_region_two_threads_and_reruns(tmp_path):
    rng = np.random.default_rng(8)
    model = quantize(cnn(rng), rng, True, False, tmp_path)
    feeds = {"x": rng.normal(size=(3, 3, 40, 33)).astype(np.float32)}
    want = run(model, feeds, "all", qie=False)[0][0]
    so = options(qie=True, threads=2)
    s = session(model, so)
    for _ in range(3):  # per-thread buffers reused between runs
        assert_equals_ort(s.run(None, feeds)[0], want)


@needs_ep
@pytest.mark.parametrize("spinning", [False, True])
def test_pacing_changes_no_result(tmp_path, spinning):
    """Each region step learns from its first runs (two warm-up, then alternating) whether to run on the pool or
    the calling thread; with pacing on or off, at 2 threads and pools spinning or not, every run through and past
    the calibration equals ORT's, and another size class of input (learnt on its own) too."""
    rng = np.random.default_rng(12)
    model = quantize(resnet_like(rng), rng, True, False, tmp_path, shape=(1, 3, 32, 32))
    sizes = [(1, 3, 24, 20), (2, 3, 9, 13)]
    feeds = [{"x": rng.normal(size=sz).astype(np.float32)} for sz in sizes]
    want = [run(model, f, "all", qie=False)[0][0] for f in feeds]
    for pacing in ("1", "0"):
        so = options(qie=False, threads=2, spinning=spinning)
        qie_ep.register(so, ep_options={"pacing": pacing})
        s = session(model, so)
        for f, w in zip(feeds, want):
            for _ in range(18):  # past the 2 + 2 x 6 calibration runs of every step
                assert_equals_ort(s.run(None, f)[0], w, f"pacing={pacing}")
    with pytest.raises(ValueError, match="'pacing' must be"):
        qie_ep.register(options(), ep_options={"pacing": "maybe"})


@needs_ep
@pytest.mark.parametrize("threads", [1, 2])
def test_conv_tables_fold_into_convs_with_the_same_codes(tmp_path, threads):
    """Option conv_tables (default on): a table step whose input only it reads from a conv runs in the conv's tasks;
    on and off give the same bytes, and ORT's, on u8 / s8 networks, batches and sizes changing; off, the profile
    has table steps and no conv+table (the kernel tests check every conv path with one and per-channel tables)."""
    import onnxruntime as ort

    rng = np.random.default_rng(21)
    for model in (quantize(resnet_like(rng), rng, True, False, tmp_path, shape=(1, 3, 32, 32)),
                  quantize(cnn(rng, "HardSwish"), rng, False, True, tmp_path)):
        feeds = [{"x": rng.normal(size=sz).astype(np.float32)} for sz in [(1, 3, 24, 20), (3, 3, 17, 9)]]
        want = [run(model, f, "all", qie=False)[0][0] for f in feeds]
        kinds = {}
        for on in ("1", "0"):
            so = options(qie=False, threads=threads)
            qie_ep.register(so, ep_options={"conv_tables": on, "profile": "1"})
            s = ort.InferenceSession(model.SerializeToString(), so)
            qie_ep.reset_stats()
            for f, w in zip(feeds, want):
                assert_equals_ort(s.run(None, f)[0], w, f"conv_tables={on}")
            kinds[on] = set(qie_ep.region_profile())
        assert "conv+table" in kinds["1"] and "conv+table" not in kinds["0"] and "table" in kinds["0"], kinds
    with pytest.raises(ValueError, match="'conv_tables' must be"):
        qie_ep.register(options(), ep_options={"conv_tables": "yes"})


@needs_ep
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("spinning", [False, True])
def test_team_runs_every_section_with_the_same_codes(tmp_path, threads, spinning):
    """Option team (default on): a region run wakes the pool once and its members take every parallel section
    (team.h). On and off, at 1, 2 and 4 threads (more than this host's cores), pools spinning or not, every run
    (through the pool-size detection and the pacing calibration) equals ORT's, for batches and sizes changing;
    a run whose input is wrong still fails with the step's error, never hangs, and the session runs on after it."""
    rng = np.random.default_rng(23)
    model = quantize(cnn(rng), rng, True, False, tmp_path)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"  # let ORT accept a wrong channel count
    feeds = [{"x": rng.normal(size=sz).astype(np.float32)} for sz in [(1, 3, 24, 20), (3, 3, 17, 9), (2, 3, 40, 36)]]
    want = [run(model, f, "all", qie=False)[0][0] for f in feeds]
    for team in ("1", "0"):
        so = options(qie=False, threads=threads, spinning=spinning, log_level=4)
        qie_ep.register(so, ep_options={"team": team})
        s = session(model, so)
        for k in range(20):
            f, w = feeds[k % 3], want[k % 3]
            assert_equals_ort(s.run(None, f)[0], w, f"team={team} run {k}")
            if k == 7:
                with pytest.raises(Exception, match=r"channels|expects|X has"):
                    s.run(None, {"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)})
    with pytest.raises(ValueError, match="'team' must be"):
        qie_ep.register(options(), ep_options={"team": "2"})


@needs_ep
def test_team_with_concurrent_runs(tmp_path):
    """Runs of one session from four Python threads at once, 2 intra-op threads: every team has its own leader,
    buffers and sections, so every output equals ORT's (and nothing waits forever)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(24)
    model = quantize(resnet_like(rng), rng, True, False, tmp_path, shape=(1, 3, 32, 32))
    feeds = [{"x": rng.normal(size=(1 + i % 2, 3, 20 + 4 * i, 24)).astype(np.float32)} for i in range(4)]
    want = [run(model, f, "all", qie=False)[0][0] for f in feeds]
    so = options(qie=False, threads=2)
    qie_ep.register(so)
    s = session(model, so)

    def work(i):
        for _ in range(10):
            assert_equals_ort(s.run(None, feeds[i])[0], want[i], f"thread {i}")

    with ThreadPoolExecutor(4) as ex:
        for f in [ex.submit(work, i) for i in range(4)]:
            f.result(timeout=120)


@needs_ep
def test_region_stops_at_a_graph_output(tmp_path):
    """An intermediate value that is also a graph output ends the chain there; both outputs equal ORT's."""
    rng = np.random.default_rng(9)
    model = quantize(cnn(rng, extra_output=True), rng, True, False, tmp_path)
    feeds = {"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)}
    got, claimed = run(model, feeds, "all", qie=True)
    want, _ = run(model, feeds, "all", qie=False)
    for g, w in zip(got, want):
        assert_equals_ort(g, w)


@needs_ep
def test_wrong_channel_count_is_an_error(tmp_path):
    """A run-time input whose channels differ from the first convolution's is a clear error naming the input."""
    rng = np.random.default_rng(10)
    model = quantize(cnn(rng), rng, True, False, tmp_path)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "C"  # let ORT accept 4 channels
    s = session(model, options(qie=True, log_level=4))
    with pytest.raises(Exception, match=r"channels|expects|X has"):
        s.run(None, {"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)})


@needs_ep
def test_one_conv_is_not_a_region(tmp_path):
    """A chain with a single convolution stays with ORT (no gain over MLAS's QLinearConv, transposes to pay)."""
    rng = np.random.default_rng(11)
    w = (rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(np.float32)
    g = h.make_graph([h.make_node("Conv", ["x", "w"], ["c"], pads=[1] * 4), h.make_node("Relu", ["c"], ["y"])], "one",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(w, "w")])
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False, tmp_path,
                     shape=(1, 3, 8, 8))
    feeds = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    (got,), claimed = run(model, feeds, "all", qie=True)
    assert claimed == 0
    assert_equals_ort(got, run(model, feeds, "all", qie=False)[0][0])


def resnet_like(rng, c=8):
    """Float CNN with every region unit kind and a fork: conv s2 -> Relu -> MaxPool -> residual block (two convs,
    Add of the block input, Relu) -> squeeze-excitation (GlobalAveragePool, two 1x1 convs, HardSigmoid, Mul
    broadcast over H, W) -> two branches (1x1 conv; 3x3 conv without bias + Add of a [1,C,1,1] constant) ->
    Concat on channels -> 1x1 conv."""
    inits, nodes = [], []

    def conv(x, cin, cout, k, name, stride=1, bias=True):
        w = (rng.normal(size=(cout, cin, k, k)) * (1.5 / np.sqrt(cin * k * k))).astype(np.float32)
        inits.append(nh.from_array(w, name + "_w"))
        ins = [x, name + "_w"]
        if bias:
            inits.append(nh.from_array((rng.normal(size=cout) * 0.1).astype(np.float32), name + "_b"))
            ins.append(name + "_b")
        nodes.append(h.make_node("Conv", ins, [name], pads=[k // 2] * 4, strides=[stride] * 2))
        return name

    def op(kind, ins, name, **attrs):
        nodes.append(h.make_node(kind, ins, [name], **attrs))
        return name

    x = op("Relu", [conv("x", 3, c, 3, "stem", 2)], "stem_r")
    x = op("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    b = op("Relu", [conv(x, c, c, 3, "b1")], "b1_r")
    x = op("Relu", [op("Add", [conv(b, c, c, 3, "b2"), x], "res")], "res_r")
    g = op("GlobalAveragePool", [x], "gap")
    e = op("Relu", [conv(g, c, c // 2, 1, "se1")], "se1_r")
    x = op("Mul", [x, op("HardSigmoid", [conv(e, c // 2, c, 1, "se2")], "se_hs")], "se_mul")
    inits.append(nh.from_array((rng.normal(size=(1, c, 1, 1)) * 0.2).astype(np.float32), "k2_bias"))
    k1 = conv(x, c, c, 1, "k1")
    k2 = op("Add", [conv(x, c, c, 3, "k2", bias=False), "k2_bias"], "k2_add")
    y = conv(op("Concat", [k1, k2], "cat", axis=1), 2 * c, c, 1, "y")
    g = h.make_graph(nodes, "resnet_like", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info(y, T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def assert_equals_ort(got, want, what=""):
    """Equal to ORT's run; where ORT's kernels are not the reference (`make valgrind`: its AVX2 paths, float
    convolutions there may round a DISABLE_ALL value the other way), within cosine 0.999: valgrind's job is the
    memory."""
    if COMPARE_BUILTIN:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        a, b = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
        assert a.size == 0 or a @ b >= 0.999 * np.linalg.norm(a) * np.linalg.norm(b), what


def claimed_ops(model, level="all"):
    so = options(qie=True, level=level, threads=1)
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    s = session(model, so)
    ours = [n.op_type for a in s.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME
            for n in a.get_nodes()]
    theirs = [n.op_type for a in s.get_provider_graph_assignment_info() if a.ep_name != qie_ep.EP_NAME
              for n in a.get_nodes()]
    return ours, theirs


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("per_channel,signed", [(True, False), (False, True), (True, True)])
def test_resnet_like_region_equals_ort(tmp_path, level, per_channel, signed):
    """The whole quantized network (MaxPool, residual Add with a fork, SE's GlobalAveragePool and broadcast Mul, a
    per-channel constant Add, Concat) and the input's QuantizeLinear (run on entry, straight into the region's NHWC
    buffer) are one region: only the output's DequantizeLinear stays with ORT. Results equal ORT's at every level
    (measured: no element apart; the binary and pooling units compute what ORT's float nodes and its QLinearAdd /
    QLinearMul / QLinearGlobalAveragePool give on these values). The [1,C,1,1] bias Add is a one-unit per-channel
    step, run as float code rather than by table lookups: the same codes, checked here."""
    if level != "disable" and not COMPARE_BUILTIN:
        pytest.skip("ORT's own QLinearConv is not the reference here (valgrind / no VNNI); DISABLE_ALL runs float")
    rng = np.random.default_rng(3)
    model = quantize(resnet_like(rng), rng, per_channel, signed, tmp_path, shape=(1, 3, 32, 32))
    ours, theirs = claimed_ops(model, level)
    assert sorted(theirs) == ["DequantizeLinear"], theirs  # the input's QuantizeLinear runs in the region
    assert "QuantizeLinear" in ours, ours
    assert {"Conv", "MaxPool", "GlobalAveragePool", "Mul", "Concat", "Add"} <= set(ours)
    qie_ep.reset_stats()
    for shape in ((1, 3, 32, 32), (2, 3, 17, 23), (1, 3, 1, 1), (0, 3, 16, 16)):  # and an empty batch
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        (want,), _ = run(model, feeds, level, qie=False)
        assert_equals_ort(got, want, f"{shape}")
    assert qie_ep.ep_stats()["region_runs"] >= 4, qie_ep.ep_stats()


@needs_ep
def test_region_bad_spatial_size_names_the_node(tmp_path):
    """An input too small for a convolution's kernel (ORT fails too): a clear error naming the region's node."""
    rng = np.random.default_rng(3)
    model = quantize(resnet_like(rng), rng, True, False, tmp_path, shape=(1, 3, 32, 32))
    s = session(model, options(qie=True, log_level=4))
    with pytest.raises(Exception, match=r"Conv '.*' on input \[1,3,0,16\].*kernel extent"):
        s.run(None, {"x": np.zeros((1, 3, 0, 16), np.float32)})


@needs_ep
def test_region_value_read_outside_is_an_output(tmp_path):
    """A value inside the region that a graph output (and a float node outside) also reads: the region gives it
    as a second output, both equal ORT's."""
    rng = np.random.default_rng(4)
    model = resnet_like(rng)
    model.graph.output.append(h.make_tensor_value_info("res_r", T.FLOAT, None))
    model = quantize(model, rng, True, False, tmp_path, shape=(1, 3, 32, 32))
    feeds = {"x": rng.normal(size=(2, 3, 20, 20)).astype(np.float32)}
    got, claimed = run(model, feeds, "all", qie=True)
    want, _ = run(model, feeds, "all", qie=False)
    assert claimed > 40
    for g, w in zip(got, want):
        assert_equals_ort(g, w)


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
def test_region_that_a_path_leaves_and_reenters_is_cut(tmp_path, level):
    """conv1's result goes through a float op qie does not claim (Floor) and comes back into the region through
    conv3 and the Add: fusing all of it would make a cycle. The region is cut where the path re-enters, and what is
    cut away (conv3, the Add, conv4) forms a second region after it; the session builds and equals ORT."""
    rng = np.random.default_rng(5)
    c = 4
    ws = {f"w{i}": (rng.normal(size=(c, 3 if i == 1 else c, 3, 3)) * 0.3).astype(np.float32) for i in (1, 2, 3, 4)}
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4),
             h.make_node("Conv", ["a", "w2"], ["b"], pads=[1] * 4),
             h.make_node("Floor", ["a"], ["f"]),
             h.make_node("Conv", ["f", "w3"], ["d"], pads=[1] * 4),
             h.make_node("Add", ["b", "d"], ["s"]),
             h.make_node("Conv", ["s", "w4"], ["y"], pads=[1] * 4)]
    g = h.make_graph(nodes, "reenter", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(v, k) for k, v in ws.items()])
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False,
                     tmp_path, shape=(1, 3, 8, 8))
    feeds = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    before = qie_ep.ep_stats()["regions"]
    ours, theirs = claimed_ops(model, level)
    assert ours.count("Conv") == 4 and "Add" in ours and "Floor" in theirs, (ours, theirs)
    assert qie_ep.ep_stats()["regions"] - before == 2
    (got,), _ = run(model, feeds, level, qie=True)
    assert_equals_ort(got, run(model, feeds, level, qie=False)[0][0])


def random_network(seed, c=8, inline_hardswish=False):
    """A random stack of blocks (strided / grouped / dilated convs, residual Adds, squeeze-excitation, Concat,
    MaxPool, AveragePool, per-channel bias Adds, exact activations) from one seed, for property-style region checks.
    ``inline_hardswish``: HardSwish written x * HardSigmoid(x), as ORT's pre-processing leaves it (same draws)."""
    rng = np.random.default_rng(seed)
    inits, nodes, count = [], [], [0]

    def fresh(prefix):
        count[0] += 1
        return f"{prefix}{count[0]}"

    def conv(x, cin, cout, k=3, stride=1, group=1, dil=1, bias=True):
        name = fresh("conv")
        w = (rng.normal(size=(cout, cin // group, k, k)) * (1.5 / np.sqrt(cin // group * k * k))).astype(np.float32)
        inits.append(nh.from_array(w, name + "_w"))
        ins = [x, name + "_w"]
        if bias:
            inits.append(nh.from_array((rng.normal(size=cout) * 0.1).astype(np.float32), name + "_b"))
            ins.append(name + "_b")
        pad = dil * (k // 2)
        nodes.append(h.make_node("Conv", ins, [name], pads=[pad] * 4, strides=[stride] * 2, group=group,
                                 dilations=[dil] * 2))
        return name

    def op(kind, ins, **attrs):
        name = fresh(kind.lower())
        nodes.append(h.make_node(kind, ins, [name], **attrs))
        return name

    def act(x):
        kind = ["Relu", "HardSwish", "LeakyRelu", "Clip", None][rng.integers(5)]
        if kind == "Clip":
            lo, hi = fresh("lo"), fresh("hi")
            inits.extend([nh.from_array(np.array(0, np.float32), lo), nh.from_array(np.array(6, np.float32), hi)])
            return op("Clip", [x, lo, hi])
        if kind == "HardSwish" and inline_hardswish:
            return op("Mul", [x, op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
        return op(kind, [x], **({"alpha": 0.1} if kind == "LeakyRelu" else {})) if kind else x

    x = act(conv("x", 3, c, 3, stride=2))
    for _ in range(int(rng.integers(3, 6))):
        block = rng.integers(6)
        if block == 0:  # residual
            x = act(op("Add", [conv(act(conv(x, c, c)), c, c), x]))
        elif block == 1:  # depthwise (maybe strided or dilated) + pointwise
            x = act(conv(act(conv(x, c, c, 3, stride=int(rng.integers(1, 3)), group=c, dil=int(rng.integers(1, 3)))),
                         c, c, 1))
        elif block == 2:  # squeeze-excitation
            s = op("HardSigmoid", [conv(act(conv(op("GlobalAveragePool", [x]), c, c // 2, 1)), c // 2, c, 1)])
            x = op("Mul", [x, s])
        elif block == 3:  # two branches concatenated, back to c channels
            x = conv(op("Concat", [conv(x, c, c, 1), act(conv(x, c, c // 2, 3))], axis=1), c + c // 2, c, 1)
        elif block == 4 and rng.integers(2):
            x = op("MaxPool", [x], kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER")
        elif block == 4:
            x = op("AveragePool", [x], kernel_shape=[3, 3], strides=[int(rng.integers(1, 3))] * 2, pads=[1] * 4,
                   count_include_pad=1)  # exact; without it see test_average_pool_without_padding_within_one_step
        else:  # bias as its own Add, as Paddle exports it
            b = fresh("bias")
            inits.append(nh.from_array((rng.normal(size=(1, c, 1, 1)) * 0.2).astype(np.float32), b))
            x = act(op("Add", [conv(x, c, c, bias=False), b]))
    x = conv(x, c, c, 1)
    g = h.make_graph(nodes, f"random{seed}", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info(x, T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@needs_ep
@pytest.mark.parametrize("seed", range(16))
def test_random_networks_equal_ort(tmp_path, seed):
    """Random block stacks, quantized as a user would: (nearly) everything runs in qie's regions, and the results
    equal ORT's at DISABLE_ALL and ALL (no element apart), for two input shapes."""
    rng = np.random.default_rng(100 + seed)
    model = quantize(random_network(seed), rng, bool(seed % 2), bool(seed % 3 == 0), tmp_path, shape=(1, 3, 24, 24))
    # Every conv is claimed but where the quantizer left a float op between units (seed 15: HardSwish -> MaxPool
    # with no Q/DQ between, HardSwish not monotone) and a lone conv stays out.
    check_random_network(model, rng, seed, assert_equals_ort)


def check_random_network(model, rng, seed, compare, unclaimed_convs=1):
    """Claimed convs (all but `unclaimed_convs`), then `compare(got, want, what)` against ORT at DISABLE_ALL and ALL
    (ALL: ORT's QLinearConv as reference, where its kernels are the reference) for two input shapes."""
    for level in ("disable", "all") if COMPARE_BUILTIN else ("disable",):
        ours, theirs = claimed_ops(model, level)
        assert ours.count("Conv") >= sum(n.op_type == "Conv" for n in model.graph.node) - unclaimed_convs, (ours, theirs)
        for shape in ((1, 3, 24, 24), (2, 3, 13, 18)):
            feeds = {"x": rng.normal(size=shape).astype(np.float32)}
            (got,), _ = run(model, feeds, level, qie=True)
            (want,), _ = run(model, feeds, level, qie=False)
            compare(got, want, f"seed {seed} level {level} shape {shape}")


@needs_ep
@pytest.mark.parametrize("seed", range(8))
def test_random_networks_as_qie_quantize_leaves_them(tmp_path, seed):
    """The random block stacks with HardSwish inlined as ORT's pre-processing leaves it, quantized as `qie quantize`
    does (MatMul / Conv / Gemm only: activations, pooling, Concat, the squeeze-excitation's Mul stay float, read
    through float prefixes that may read their tensor twice): every conv in qie's regions but one where a float
    pool of a float activation has no unit form (seeds 3, 4), and the results equal ORT's but where a float step
    of ours (a GlobalAveragePool's sum in another order) rounds a code the other way: then within a step of the
    output's scale on a few elements."""
    rng = np.random.default_rng(300 + seed)
    model = quantize(random_network(seed, inline_hardswish=True), rng, bool(seed % 2), False, tmp_path,
                     shape=(1, 3, 24, 24), op_types=QIE_QUANTIZE_OPS)
    step = steps(model)

    def within_a_step(got, want, what):
        diff = np.abs(got.astype(np.float64) - want)
        assert diff.max() <= 1.0001 * step and (diff > 0).mean() <= 0.02, (what, diff.max() / step, (diff > 0).mean())

    check_random_network(model, rng, seed, within_a_step)


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("stride", [1, 2])
def test_average_pool_without_padding_within_one_step(tmp_path, level, stride):
    """AveragePool with count_include_pad=0 as a region's last unit: qie sums each window's dequantized values in
    float32 and divides by the taps inside the input; ORT's float kernel (and its QLinearAveragePool) sum border
    windows in another order, so a border output may land one step apart (measured: ~2% of the elements); the
    interior equals ORT."""
    if level != "disable" and not COMPARE_BUILTIN:
        pytest.skip("ORT's own QLinearConv is not the reference here (valgrind / no VNNI)")
    rng = np.random.default_rng(12)
    ws = [(rng.normal(size=(8, 3 if i == 0 else 8, 3, 3)) * 0.3).astype(np.float32) for i in range(2)]
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4), h.make_node("Conv", ["a", "w1"], ["b"], pads=[1] * 4),
             h.make_node("AveragePool", ["b"], ["y"], kernel_shape=[3, 3], strides=[stride] * 2, pads=[1] * 4)]
    g = h.make_graph(nodes, "avg", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 12, 12])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False, tmp_path,
                     shape=(1, 3, 12, 12))
    ours, _ = claimed_ops(model, level)
    assert "AveragePool" in ours
    feeds = {"x": rng.normal(size=(1, 3, 12, 12)).astype(np.float32)}
    (got,), _ = run(model, feeds, level, qie=True)
    (want,), _ = run(model, feeds, level, qie=False)
    apart = np.abs(got - want) / steps(model)
    assert apart.max() <= 1.0001, apart.max()
    assert (apart[..., 1:-1, 1:-1] == 0).all()  # interior windows: no padding, same sums
    assert (apart > 0.5).mean() < 0.1


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("pool", [dict(kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER"),
                                  dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
                                  dict(kernel_shape=[2, 3], strides=[2, 1], pads=[0, 2, 1, 0]),
                                  dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                         ids=["2x2_same", "3x3_s1", "2x3_s21_pads", "3x3_s2"])
def test_max_pool_in_a_region_equals_ort(tmp_path, level, signed, pool):
    """MaxPool inside a region (between two convs, so its output is requantized to the next conv's input scale
    only where the quantizer gave it another): unit-stride widths take whole spans of the output row per tap
    (pads on either side, rows the kernel overhangs), other strides each pixel's taps; equal to ORT."""
    if level != "disable" and not COMPARE_BUILTIN:
        pytest.skip("ORT's own QLinearConv is not the reference here (valgrind / no VNNI)")
    rng = np.random.default_rng(31)
    ws = [(rng.normal(size=(16, 3 if i == 0 else 16, 3, 3)) * 0.3).astype(np.float32) for i in range(2)]
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("MaxPool", ["r"], ["p"], **pool), h.make_node("Conv", ["p", "w1"], ["y"], pads=[1] * 4)]
    g = h.make_graph(nodes, "maxpool", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, signed, tmp_path,
                     shape=(1, 3, 11, 13))
    ours, _ = claimed_ops(model, level)
    assert "MaxPool" in ours, ours
    for shape in ((1, 3, 11, 13), (2, 3, 5, 7)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        (want,), _ = run(model, feeds, level, qie=False)
        assert_equals_ort(got, want, level)


def shuffle_model(groups, first, second, perm=(0, 2, 1, 3, 4), H=10, W=12, C=12):
    """conv 3 -> C, Relu, ShuffleNet's channel shuffle (Reshape ``first`` -> Transpose ``perm`` -> Reshape ``second``),
    conv C -> 8, on x[N, 3, H, W] (H, W static or symbolic: None)."""
    rng = np.random.default_rng(40 + groups)
    ws = [(rng.normal(size=(C, 3, 3, 3)) * 0.3).astype(np.float32), (rng.normal(size=(8, C, 1, 1)) * 0.3).astype(np.float32)]
    inits = [nh.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    inits += [nh.from_array(np.array(first, np.int64), "s1"), nh.from_array(np.array(second, np.int64), "s2")]
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Reshape", ["r", "s1"], ["r5"]), h.make_node("Transpose", ["r5"], ["t5"], perm=list(perm)),
             h.make_node("Reshape", ["t5", "s2"], ["sh"]), h.make_node("Conv", ["sh", "w1"], ["y"])]
    g = h.make_graph(nodes, "shuffle", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, H or "H", W or "W"])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("groups,first,second", [(2, [0, 2, 6, 10, 12], [0, -1, 10, 12]),
                                                 (3, [-1, 3, 4, 10, 12], [-1, 12, 10, 12]),
                                                 (4, [0, 4, 3, 10, 12], [0, 12, 10, 12]),
                                                 (6, [-1, 6, 2, 10, 12], [0, -1, 10, 12])],
                         ids=["g2", "g3_inferred_batch", "g4", "g6"])
def test_channel_shuffle_in_a_region_equals_ort(tmp_path, level, signed, groups, first, second):
    """ShuffleNet's channel shuffle between two convs (float between a DequantizeLinear and the next conv's
    QuantizeLinear, as `qie quantize` leaves it): a region step moving each pixel's codes (output channel j * g + i
    is input channel i * C / g + j) and requantizing them where the scales differ, so the convs on either side are
    one region; equal to ORT at every batch size."""
    if level != "disable" and not COMPARE_BUILTIN:
        pytest.skip("ORT's own QLinearConv is not the reference here (valgrind / no VNNI)")
    rng = np.random.default_rng(41)
    model = quantize(shuffle_model(groups, first, second), rng, True, signed, tmp_path, shape=(1, 3, 10, 12),
                     op_types=QIE_QUANTIZE_OPS)
    ours, theirs = claimed_ops(model, level)
    assert "Transpose" in ours and ours.count("Conv") == 2, (ours, theirs)
    for n in (1, 2, 3):
        feeds = {"x": rng.normal(size=(n, 3, 10, 12)).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        (want,), _ = run(model, feeds, level, qie=False)
        assert_equals_ort(got, want, level)


def shuffle_lrn_network(seed, c=12, hw=(10, 12)):
    """A random stack (from one seed) of convs with channel shuffles (groups dividing c), LRNs (odd sizes, random
    alpha / beta / bias), Relus and MaxPools between them, on x[N, 3, H, W] with static H, W (the shuffle's)."""
    rng = np.random.default_rng(seed)
    inits, nodes, count = [], [], [0]

    def fresh(prefix):
        count[0] += 1
        return f"{prefix}{count[0]}"

    def conv(x, cin, cout, k=3):
        name = fresh("conv")
        w = (rng.normal(size=(cout, cin, k, k)) * (1.5 / np.sqrt(cin * k * k))).astype(np.float32)
        inits.append(nh.from_array(w, name + "_w"))
        nodes.append(h.make_node("Conv", [x, name + "_w"], [name], pads=[k // 2] * 4))
        return name

    x = conv("x", 3, c)
    for _ in range(int(rng.integers(3, 6))):
        kind = int(rng.integers(4))
        name = fresh("n")
        if kind == 0:
            g = int(rng.choice([d for d in (2, 3, 4, 6) if c % d == 0]))
            s1, s2 = fresh("s"), fresh("s")
            inits += [nh.from_array(np.array([0, g, c // g, *hw], np.int64), s1),
                      nh.from_array(np.array([0, -1, *hw], np.int64), s2)]
            nodes += [h.make_node("Reshape", [x, s1], [name + "_r"]),
                      h.make_node("Transpose", [name + "_r"], [name + "_t"], perm=[0, 2, 1, 3, 4]),
                      h.make_node("Reshape", [name + "_t", s2], [name])]
        elif kind == 1:
            nodes.append(h.make_node("LRN", [x], [name], size=int(rng.choice([1, 3, 5, 7])),
                                     alpha=float(rng.uniform(1e-4, 0.5)), beta=float(rng.uniform(0.5, 1.0)),
                                     bias=float(rng.uniform(0.5, 2.0))))
        elif kind == 2:
            nodes.append(h.make_node("Relu", [x], [name]))
        else:
            nodes.append(h.make_node("MaxPool", [x], [name], kernel_shape=[3, 3], pads=[1] * 4))
        x = conv(name, c, c, int(rng.choice([1, 3])))
    g = h.make_graph(nodes, f"shuffle_lrn{seed}", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, *hw])],
                     [h.make_tensor_value_info(x, T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@needs_ep
@pytest.mark.parametrize("seed", range(8))
def test_random_shuffle_lrn_networks_within_a_step_of_ort(tmp_path, seed):
    """Random stacks of convs with channel shuffles and LRNs between them, quantized with the kernels' op types
    (shuffles float between Q / DQ) or ORT's full set (Q / DQ around each Reshape / Transpose): every conv and
    shuffle in qie's regions, the outputs within a step of ORT's at DISABLE_ALL and ALL (an LRN's powf / sqrt
    form may round a code the other way), for two batch sizes."""
    rng = np.random.default_rng(500 + seed)
    model = quantize(shuffle_lrn_network(seed), rng, bool(seed % 2), bool(seed % 3 == 0), tmp_path,
                     shape=(1, 3, 10, 12), op_types=QIE_QUANTIZE_OPS if seed % 2 else None)
    step = steps(model)
    n_shuffles = sum(n.op_type == "Transpose" for n in model.graph.node)
    for level in ("disable", "all") if COMPARE_BUILTIN else ("disable",):
        ours, theirs = claimed_ops(model, level)
        assert ours.count("Conv") == sum(n.op_type == "Conv" for n in model.graph.node), (ours, theirs)
        assert ours.count("Transpose") == n_shuffles, (ours, theirs)
        assert ours.count("LRN") == sum(n.op_type == "LRN" for n in model.graph.node), (ours, theirs)
        for n in (1, 2):
            feeds = {"x": rng.normal(size=(n, 3, 10, 12)).astype(np.float32)}
            (got,), _ = run(model, feeds, level, qie=True)
            (want,), _ = run(model, feeds, level, qie=False)
            diff = np.abs(got.astype(np.float64) - want)
            assert diff.max() <= (1.0001 if COMPARE_BUILTIN else 3.0001) * step, (seed, level, diff.max() / step)
            assert (diff > 0).mean() <= 0.02, (seed, level, (diff > 0).mean())


def claims_and_equals_ort(model, level, op, shapes, rng, convs=2):
    """`op` and `convs` convolutions in qie's regions at `level`; the outputs equal ORT's for each input shape."""
    ours, theirs = claimed_ops(model, level)
    assert op in ours and ours.count("Conv") == convs, (ours, theirs)
    for shape in shapes:
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        (want,), _ = run(model, feeds, level, qie=False)
        assert_equals_ort(got, want, level)


def stays_ort(model, op, shape, rng):
    """`op` left to ORT at ORT_ENABLE_ALL; the outputs still ORT's."""
    ours, theirs = claimed_ops(model, "all")
    assert op not in ours and op in theirs, (ours, theirs)
    feeds = {"x": rng.normal(size=shape).astype(np.float32)}
    (got,), _ = run(model, feeds, "all", qie=True)
    assert_equals_ort(got, run(model, feeds, "all", qie=False)[0][0])


def slice_model(start, end, axis=1, step=None, dtype=np.int64, C=12):
    """conv 3 -> C, then two convs reading channel slices of it (``start``:``end`` and its complement's first half),
    their outputs concatenated; on x[N, 3, H, W]."""
    rng = np.random.default_rng(60)
    ws = [(rng.normal(size=(C, 3, 3, 3)) * 0.3).astype(np.float32)]
    inits = [nh.from_array(ws[0], "w0"), nh.from_array(np.array([start], dtype), "st"),
             nh.from_array(np.array([end], dtype), "en"), nh.from_array(np.array([axis], dtype), "ax")]
    ins = ["a", "st", "en", "ax"]
    if step is not None:
        inits.append(nh.from_array(np.array([step], dtype), "sp"))
        ins.append("sp")
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4), h.make_node("Slice", ins, ["s"])]
    g = h.make_graph(nodes, "slice", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])], [], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    shape = onnx.shape_inference.infer_shapes(m).graph.value_info
    width = next(v for v in shape if v.name == "s").type.tensor_type.shape.dim[1].dim_value if axis in (1, -3) else C
    w1 = (rng.normal(size=(8, width, 1, 1)) * 0.3).astype(np.float32)
    m.graph.initializer.append(nh.from_array(w1, "w1"))
    m.graph.node.append(h.make_node("Conv", ["s", "w1"], ["y"]))
    m.graph.output.append(h.make_tensor_value_info("y", T.FLOAT, None))
    return m


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("ops", ["kernels", "ort"])
@pytest.mark.parametrize("start,end,axis,dtype", [(0, 6, 1, np.int64), (6, 2**63 - 1, 1, np.int64),
                                                  (-5, -1, -3, np.int64), (2, 100, 1, np.int32)],
                         ids=["head", "tail_to_max", "negative", "past_the_end_int32"])
def test_channel_slice_in_a_region_equals_ort(tmp_path, level, ops, start, end, axis, dtype):
    """YOLO's C2f splits written as Slice along the channel axis, between two convs (float between Q / DQ with the
    kernels' op types; DQ -> Slice -> Q of one scale with ORT's): a region step copying each pixel's channel range
    (ONNX's start / end: negative from the end, clamped), requantized where the scales differ; equal to ORT."""
    if level != "disable" and not COMPARE_BUILTIN:
        pytest.skip("ORT's own QLinearConv is not the reference here (valgrind / no VNNI)")
    rng = np.random.default_rng(61)
    model = quantize(slice_model(start, end, axis, dtype=dtype), rng, True, False, tmp_path, shape=(1, 3, 9, 10),
                     op_types=QIE_QUANTIZE_OPS if ops == "kernels" else None)
    claims_and_equals_ort(model, level, "Slice", ((1, 3, 9, 10), (2, 3, 5, 7)), rng)


@needs_ep
@pytest.mark.parametrize("axis,step", [(2, None), (1, 2)], ids=["height_axis", "step_2"])
def test_slice_that_is_no_channel_range_stays_ort(tmp_path, axis, step):
    rng = np.random.default_rng(62)
    model = quantize(slice_model(0, 6, axis, step=step), rng, True, False, tmp_path, shape=(1, 3, 9, 10),
                     op_types=QIE_QUANTIZE_OPS)
    stays_ort(model, "Slice", (2, 3, 9, 10), rng)


def resize_model(scales, mode="nearest", coord="asymmetric", nearest="floor"):
    """conv 3 -> 8, Resize by constant ``scales`` [1, 1, sh, sw], conv 8 -> 8 (YOLO's neck upsampling)."""
    rng = np.random.default_rng(70)
    ws = [(rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), (rng.normal(size=(8, 8, 3, 3)) * 0.2).astype(np.float32)]
    inits = [nh.from_array(w, f"w{i}") for i, w in enumerate(ws)] + [nh.from_array(np.array(scales, np.float32), "sc")]
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4),
             h.make_node("Resize", ["a", "", "sc"], ["r"], mode=mode, coordinate_transformation_mode=coord,
                         nearest_mode=nearest),
             h.make_node("Conv", ["r", "w1"], ["y"], pads=[1] * 4)]
    g = h.make_graph(nodes, "resize", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("ops", ["kernels", "ort"])
@pytest.mark.parametrize("scales,coord,nearest", [([1, 1, 2, 2], "asymmetric", "floor"),
                                                  ([1, 1, 2, 3], "half_pixel", "round_prefer_floor"),
                                                  ([1, 1, 1, 2], "half_pixel", "round_prefer_ceil")],
                         ids=["x2_torch", "2x3_half_pixel", "1x2_ceil"])
def test_nearest_resize_in_a_region_equals_ort(tmp_path, level, ops, scales, coord, nearest):
    """YOLO's nearest upsampling between two convs: integer scales whose modes read input pixel (oh / sh, ow / sw)
    become a region step repeating codes (requantized where the scales differ); equal to ORT."""
    if level != "disable" and not COMPARE_BUILTIN:
        pytest.skip("ORT's own QLinearConv is not the reference here (valgrind / no VNNI)")
    rng = np.random.default_rng(71)
    model = quantize(resize_model(scales, coord=coord, nearest=nearest), rng, True, False, tmp_path,
                     shape=(1, 3, 6, 7), op_types=QIE_QUANTIZE_OPS if ops == "kernels" else None)
    claims_and_equals_ort(model, level, "Resize", ((1, 3, 6, 7), (2, 3, 3, 5)), rng)


@needs_ep
@pytest.mark.parametrize("scales,mode,coord,nearest", [([1, 1, 2, 2], "nearest", "asymmetric", "round_prefer_floor"),
                                                       ([1, 1, 2, 2], "nearest", "half_pixel", "floor"),
                                                       ([1, 1, 1.5, 2], "nearest", "asymmetric", "floor"),
                                                       ([1, 1, 2, 2], "linear", "asymmetric", "floor")],
                         ids=["asymmetric_round", "half_pixel_floor", "fractional", "linear"])
def test_resize_that_is_no_pixel_repeat_stays_ort(tmp_path, scales, mode, coord, nearest):
    rng = np.random.default_rng(72)
    model = quantize(resize_model(scales, mode, coord, nearest), rng, True, False, tmp_path, shape=(1, 3, 6, 7),
                     op_types=QIE_QUANTIZE_OPS)
    stays_ort(model, "Resize", (2, 3, 6, 7), rng)


@needs_ep
def test_channel_shuffle_with_requantizing_qdq_pairs_inside(tmp_path):
    """Q -> DQ pairs inside the shuffle (ORT's QDQ propagation puts them there with the input's scale, the identity;
    here with other scales and zero points): each pair rounds as the QDQ graph does, composed into the unit's table."""
    rng = np.random.default_rng(43)
    model = quantize(shuffle_model(3, [0, 3, 4, 10, 12], [0, 12, 10, 12]), rng, True, False, tmp_path,
                     shape=(1, 3, 10, 12), op_types=QIE_QUANTIZE_OPS)
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    relu = next(n for n in model.graph.node if n.output[0] == reshape.input[0])
    dq = next(n for n in model.graph.node if n.output[0] == relu.input[0])
    s_in = float(nh.to_array(next(i for i in model.graph.initializer if i.name == dq.input[1])))
    nodes = list(model.graph.node)
    for tensor, scale, zp in (("r5", s_in * 1.7, 120), ("t5", s_in * 0.6, 131)):
        model.graph.initializer.extend([nh.from_array(np.array(scale, np.float32), tensor + "_ps"),
                                        nh.from_array(np.array(zp, np.uint8), tensor + "_pz")])
        for n in nodes:
            n.input[:] = [tensor + "_pd" if i == tensor else i for i in n.input]
        at = next(k for k, n in enumerate(nodes) if tensor in n.output) + 1
        nodes[at:at] = [h.make_node("QuantizeLinear", [tensor, tensor + "_ps", tensor + "_pz"], [tensor + "_pq"]),
                        h.make_node("DequantizeLinear", [tensor + "_pq", tensor + "_ps", tensor + "_pz"], [tensor + "_pd"])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    ours, theirs = claimed_ops(model, "disable")
    assert "Transpose" in ours and ours.count("QuantizeLinear") >= 3, (ours, theirs)
    for n in (1, 2):
        feeds = {"x": rng.normal(size=(n, 3, 10, 12)).astype(np.float32)}
        (got,), _ = run(model, feeds, "disable", qie=True)
        (want,), _ = run(model, feeds, "disable", qie=False)
        assert_equals_ort(got, want)


@needs_ep
@pytest.mark.parametrize("case", ["symbolic_spatial", "other_perm", "groups_mismatch"])
def test_reshape_transpose_that_is_no_channel_shuffle_stays_ort(tmp_path, case):
    """Only the exact shuffle is a unit: with symbolic H / W (the targets' sizes are not provably the input's), a
    Transpose that moves other axes, or groups that do not multiply to C, ORT runs the Reshape / Transpose nodes;
    the results stay ORT's."""
    kw = {"symbolic_spatial": dict(groups=2, first=[0, 2, 6, 10, 12], second=[0, -1, 10, 12], H=None, W=None),
          "other_perm": dict(groups=2, first=[0, 2, 6, 10, 12], second=[0, 12, 12, 10], perm=(0, 2, 1, 4, 3)),
          "groups_mismatch": dict(groups=2, first=[0, 2, 3, 20, 12], second=[0, 12, 10, 12], C=12)}[case]
    rng = np.random.default_rng(42)
    model = quantize(shuffle_model(**kw), rng, True, False, tmp_path, shape=(1, 3, 10, 12), op_types=QIE_QUANTIZE_OPS)
    stays_ort(model, "Transpose", (2, 3, 10, 12), rng)


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("size,channels,alpha,beta,bias", [(5, 16, 1e-2, 0.75, 1.0), (3, 12, 0.5, 0.6, 2.0),
                                                           (1, 8, 0.1, 1.0, 1.0), (7, 5, 1e-3, 0.75, 1.0)],
                         ids=["googlenet", "size3", "size1", "window_over_channels"])
def test_lrn_in_a_region_within_one_step_of_ort(tmp_path, level, size, channels, alpha, beta, bias):
    """GoogLeNet / AlexNet's LRN between two convs (float between a DequantizeLinear and the next conv's
    QuantizeLinear; a Relu before it: the prefix at ORT_DISABLE_ALL, its own table unit above): computed in the region
    as ORT's float kernel does (window sums in its order, powf; ORT's pow is Eigen's), so each of its codes is
    within one step of ORT's and nearly all equal. The LRN's codes are read out (its Q's DequantizeLinear made a
    graph output)."""
    rng = np.random.default_rng(50 + size)
    ws = [(rng.normal(size=(channels, 3, 3, 3)) * 0.4).astype(np.float32),
          (rng.normal(size=(8, channels, 1, 1)) * 0.3).astype(np.float32)]
    nodes = [h.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 4), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("LRN", ["r"], ["n"], size=size, alpha=alpha, beta=beta, bias=bias),
             h.make_node("Conv", ["n", "w1"], ["y"])]
    g = h.make_graph(nodes, "lrn", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False, tmp_path,
                     shape=(1, 3, 9, 11), op_types=QIE_QUANTIZE_OPS)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "n")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    step = float(nh.to_array(next(i for i in model.graph.initializer if i.name == q.input[1])))
    model.graph.output.append(h.make_tensor_value_info(dq.output[0], T.FLOAT, None))
    ours, theirs = claimed_ops(model, level)
    assert "LRN" in ours and ours.count("Conv") == 2, (ours, theirs)
    apart = []
    for shape in ((1, 3, 9, 11), (2, 3, 4, 6)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (_, got), _ = run(model, feeds, level, qie=True)
        (_, want), _ = run(model, feeds, level, qie=False)
        apart.append((np.abs(got - want) / step).ravel())
    apart = np.concatenate(apart)
    if not COMPARE_BUILTIN:  # valgrind: ORT's float convs are not the reference; the LRN ran, its memory checked
        assert apart.max() <= 3.0001, apart.max()
        return
    assert apart.max() <= 1.0001, apart.max()
    assert (apart > 0.5).mean() < 0.01, (apart > 0.5).mean()
    print(f"LRN {size} {level}: {int((apart > 0.5).sum())} of {apart.size} codes one step apart")


@needs_ep
def test_ep_options_turn_regions_off_and_are_checked(tmp_path):
    """`register(so, ep_options=...)`: regions off or a higher conv minimum leave the model to ORT (same results);
    bad keys and values are ValueErrors naming them; a bad value that reaches the library fails the EP's creation
    with a message naming the option."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    model = quantize(resnet_like(rng), rng, True, False, tmp_path, shape=(1, 3, 32, 32))
    feeds = {"x": rng.normal(size=(1, 3, 20, 20)).astype(np.float32)}
    want = run(model, feeds, "all", qie=False)[0][0]

    def claimed(opts):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        qie_ep.register(so, ep_options=opts)
        s = ort.InferenceSession(model.SerializeToString(), so)
        assert_equals_ort(s.run(None, feeds)[0], want)
        return sum(len(a.get_nodes()) for a in s.get_provider_graph_assignment_info() if a.ep_name == qie_ep.EP_NAME)

    assert claimed({}) > 40
    assert claimed({"regions": "0"}) == 0
    assert claimed({"min_region_convs": 9}) == 0  # the network has 8 convolutions
    assert claimed({"min_region_convs": 8, "units": False}) > 40
    for bad, msg in (({"region": "0"}, "unknown qie EP option 'region'"), ({"regions": "yes"}, "'regions' must be"),
                     ({"min_region_convs": "0"}, "integer >= 1")):
        with pytest.raises(ValueError, match=msg):
            qie_ep.register(ort.SessionOptions(), ep_options=bad)
    so = ort.SessionOptions()
    qie_ep.register(so)
    so.add_session_config_entry("ep.qie.regions", "2")  # past the Python check
    with pytest.raises(Exception, match="option 'regions' must be 0 or 1"):
        # ORT's own session class, without the Python wrapper's retry on the CPU EP alone
        from onnxruntime.capi import _pybind_state as C

        C.InferenceSession(so, model.SerializeToString(), False, False).initialize_session([], [], set())


@needs_ep
def test_region_profile_counts_unit_kinds(tmp_path):
    """With ep_options={"profile": "1"} the regions time each unit kind and the layout changes at their edges, and
    each step (``region_profile(steps=True)``, keyed by its unit's op node: every claimed Conv of the model there,
    each run once per session run, the steps' time within the kinds'); without it nothing is recorded."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    fp32 = resnet_like(rng)
    for i, n in enumerate(fp32.graph.node):  # the steps are keyed by node name
        n.name = n.name or f"{n.op_type.lower()}{i}"
    model = quantize(fp32, rng, True, False, tmp_path, shape=(1, 3, 32, 32))
    feeds = {"x": rng.normal(size=(1, 3, 20, 20)).astype(np.float32)}
    for profile in ("0", "1"):
        so = ort.SessionOptions()
        qie_ep.register(so, ep_options={"profile": profile})
        s = ort.InferenceSession(model.SerializeToString(), so)
        qie_ep.reset_stats()
        for _ in range(3):
            s.run(None, feeds)
        p = qie_ep.region_profile()
        if profile == "0":
            assert p == {}
        else:
            # 8 convs, those whose output only a table reads with the table folded in (conv+table)
            assert p["conv"]["runs"] + p["conv+table"]["runs"] == 3 * 8 and p["conv+table"]["runs"] >= 3, p
            assert p["layout"]["runs"] == 3 * 2, p  # one input, one output
            assert {"binary", "gap", "concat", "maxpool"} <= set(p) and all(v["ms"] > 0 for v in p.values())
        steps = qie_ep.region_profile(steps=True)
        if profile == "0":
            assert steps == {}
            continue
        convs = {f"Conv '{n.name}'" for n in model.graph.node if n.op_type == "Conv"}
        assert len(convs) == 8 and convs <= set(steps), (convs, steps)
        assert all(v["runs"] == 3 and v["ms"] > 0 for v in steps.values()), steps
        kinds_ms = sum(v["ms"] for k, v in p.items() if k != "layout")
        assert sum(v["ms"] for v in steps.values()) == pytest.approx(kinds_ms, rel=1e-6), (steps, p)
        qie_ep.reset_stats()
        assert qie_ep.region_profile(steps=True) == {}


@needs_ep
@pytest.mark.parametrize("extra_output", [False, True])
@pytest.mark.parametrize("level", ["disable", "all"])
def test_silu_folds_into_one_table(tmp_path, level, extra_output):
    """SiLU as the quantizer leaves it (Mul(DQ(x), DQ(Q(Sigmoid(DQ(x)))))) is a binary unit whose operands are x
    and a table of x: the plan folds it into one table of x (no binary unit runs), with ORT's results. When the
    Sigmoid's codes are also read outside the region (a graph output), its table step stays and the Mul still folds.
    Tables whose input only they read from a conv are folded into that conv (conv+table)."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    model = cnn(rng, "SiLU")
    if extra_output:
        model.graph.output.append(h.make_tensor_value_info("a2_s", T.FLOAT, None))
    model = quantize(model, rng, True, False, tmp_path)
    feeds = {"x": rng.normal(size=(1, 3, 18, 14)).astype(np.float32)}
    so = options(qie=False, level=level)
    qie_ep.register(so, ep_options={"profile": "1"})
    s = ort.InferenceSession(model.SerializeToString(), so)
    qie_ep.reset_stats()
    got = s.run(None, feeds)
    p = qie_ep.region_profile()
    # no binary unit runs; the convs' following tables (the folded SiLU among them) run inside the convs
    assert "binary" not in p and p["conv+table"]["runs"] >= 3 and p["table"]["runs"] >= (3 if extra_output else 1), p
    want, _ = run(model, feeds, level, qie=False)
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= steps(model) * 1.0001


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
def test_binary_units_broadcast_like_numpy(tmp_path, level):
    """Residual and attention-style products with every broadcast the region's binary unit meets: [N,C,H,W] with
    [N,1,H,W] (a one-channel spatial mask), [N,C,1,1] (squeeze-excitation) and [N,C,H,1] (a row gate, from a
    pooled branch); results equal ORT's."""
    rng = np.random.default_rng(21)
    c = 8

    def w(cout, cin, k):
        return (rng.normal(size=(cout, cin, k, k)) * (1.2 / np.sqrt(cin * k * k))).astype(np.float32)

    ws = {"w1": w(c, 3, 3), "w2": w(1, c, 3), "w3": w(c, c, 1), "w4": w(c, c, 1), "w5": w(c, c, 3)}
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1] * 4),
             h.make_node("Conv", ["a", "w2"], ["m"], pads=[1] * 4),  # [N,1,H,W]
             h.make_node("Mul", ["a", "m"], ["am"]),
             h.make_node("GlobalAveragePool", ["am"], ["g"]),
             h.make_node("Conv", ["g", "w3"], ["gc"]),  # [N,C,1,1]
             h.make_node("Add", ["am", "gc"], ["s"]),
             h.make_node("ReduceMean", ["s"], ["r"], axes=[3], keepdims=1),  # [N,C,H,1], float: left to ORT
             h.make_node("Conv", ["r", "w4"], ["rc"]),
             h.make_node("Mul", ["s", "rc"], ["t"]),
             h.make_node("Conv", ["t", "w5"], ["y"], pads=[1] * 4)]
    g = h.make_graph(nodes, "broadcasts", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(v, k) for k, v in ws.items()])
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False,
                     tmp_path, shape=(1, 3, 12, 10))
    ours, _ = claimed_ops(model, level)
    assert ours.count("Mul") == 2 and "Add" in ours, ours
    for shape in ((1, 3, 12, 10), (2, 3, 7, 9)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        assert_equals_ort(got, run(model, feeds, level, qie=False)[0][0])


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
def test_two_regions_that_would_close_a_cycle(tmp_path, level):
    """Two regions, each convex on its own, each feeding the other's residual Add through a float op (Floor): fused
    together they would form a cycle, so one of them is left to ORT; the session builds and equals ORT."""
    rng = np.random.default_rng(6)
    c = 4
    ws = {f"w{i}": (rng.normal(size=(c, 3 if i in (1, 3) else c, 3, 3)) * 0.3).astype(np.float32) for i in (1, 2, 3, 4)}

    def conv(x, w, y):
        return h.make_node("Conv", [x, w], [y], pads=[1] * 4)

    nodes = [conv("x", "w1", "p1"), conv("p1", "w2", "u1"), h.make_node("Floor", ["u1"], ["fa"]),
             conv("z", "w3", "p2"), conv("p2", "w4", "v1"), h.make_node("Floor", ["v1"], ["fb"]),
             h.make_node("Add", ["p1", "fb"], ["u2"]), h.make_node("Add", ["p2", "fa"], ["v2"])]
    g = h.make_graph(nodes, "cross", [h.make_tensor_value_info(n, T.FLOAT, [1, 3, 8, 8]) for n in ("x", "z")],
                     [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("u2", "v2")],
                     [nh.from_array(v, k) for k, v in ws.items()])
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False,
                     tmp_path, shape=(1, 3, 8, 8), inputs=("x", "z"))
    before = qie_ep.ep_stats()["regions"]
    ours, theirs = claimed_ops(model, level)
    assert qie_ep.ep_stats()["regions"] - before == 1, (ours, theirs)
    assert ours.count("Conv") == 2 and theirs.count("Conv") == 2
    feeds = {k: rng.normal(size=(1, 3, 8, 8)).astype(np.float32) for k in ("x", "z")}
    got, _ = run(model, feeds, level, qie=True)
    for a, b in zip(got, run(model, feeds, level, qie=False)[0]):
        assert_equals_ort(a, b)


def conv3x3_adder(rng, c, inits, nodes):
    """conv(x, cin, name, stride=1): appends a padded 3x3 Conv of cin -> c channels (random weights scaled to keep
    the activations' range, random bias) to `nodes` / `inits` and returns its output name."""
    def conv(x, cin, name, stride=1):
        w = (rng.normal(size=(c, cin, 3, 3)) * (1.4 / np.sqrt(cin * 9))).astype(np.float32)
        inits.extend([nh.from_array(w, name + "_w"), nh.from_array((rng.normal(size=c) * 0.1).astype(np.float32),
                                                                     name + "_b")])
        nodes.append(h.make_node("Conv", [x, name + "_w", name + "_b"], [name], pads=[1] * 4, strides=[stride] * 2))
        return name
    return conv


def residual_blocks(rng, tmp_path, act, binary):
    """Two ResNet basic blocks (residual ``binary``, then ``act``) quantized as `qie quantize --op-types MatMul Conv
    Gemm` leaves them: the residual and its activation float between DequantizeLinears and a QuantizeLinear."""
    c, inits, nodes = 8, [], []
    conv = conv3x3_adder(rng, c, inits, nodes)

    def activation(x, name):
        if act == "Clip":
            inits.extend([nh.from_array(np.array(0, np.float32), name + "_lo"),
                          nh.from_array(np.array(6, np.float32), name + "_hi")])
            nodes.append(h.make_node("Clip", [x, name + "_lo", name + "_hi"], [name]))
        else:
            nodes.append(h.make_node("Relu", [x], [name]))
        return name

    x = activation(conv("x", 3, "stem", 2), "stem_a")
    for i in range(2):
        y = conv(activation(conv(x, c, f"b{i}a"), f"b{i}r"), c, f"b{i}b")
        nodes.append(h.make_node(binary, [y, x], [f"b{i}s"]))
        x = activation(f"b{i}s", f"b{i}o")
    y = conv(x, c, "head")
    g = h.make_graph(nodes, "resnet_blocks", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info(y, T.FLOAT, None)], inits)
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False,
                     tmp_path, op_types=QIE_QUANTIZE_OPS)
    return model


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("act,binary", [("Relu", "Add"), ("Clip", "Add"), ("Relu", "Sum")])
def test_residual_add_with_float_activation_as_qie_quantize_leaves_it(tmp_path, level, act, binary):
    """ResNet basic blocks quantized the way `qie quantize` does by default (MatMul / Conv / Gemm only): the
    residual Add and the activation after it stay float between a DequantizeLinear pair and a QuantizeLinear.
    The region takes them as one binary unit with an activation program; every node but the input Q and the output
    DQ runs on qie, equal to ORT. Older exports (Caffe2's ResNet-50 and ShuffleNet in the onnx wheel) write the
    residual as a two-input Sum: the same unit."""
    rng = np.random.default_rng(31)
    model = residual_blocks(rng, tmp_path, act, binary)
    ours, theirs = claimed_ops(model, level)
    assert sorted(theirs) == ["DequantizeLinear"], theirs  # the input's QuantizeLinear runs in the region
    assert "QuantizeLinear" in ours, ours
    assert ours.count(binary) == 2 and ours.count(act) >= 5, ours
    for shape in ((1, 3, 16, 16), (2, 3, 11, 7)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        assert_equals_ort(got, run(model, feeds, level, qie=False)[0][0])


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_residual_activation_clamps_codes_its_quantizer_does_not(tmp_path, level, act):
    """A Relu / Clip after a residual Add runs as a clamp of the Add's output codes, Q(clip(v)) = clamp(Q(v), Q(lo),
    Q(hi)): exact because Q does not decrease. Calibrated, the QuantizeLinear after it saturates where the clamp
    would (its range is the activation's); here its zero point is moved to mid-range and its scale halved, so the
    clamp does the work: still ORT's codes."""
    if level != "disable" and not COMPARE_BUILTIN:
        pytest.skip("ORT's own QLinearConv is not the reference here (valgrind / no VNNI)")
    rng = np.random.default_rng(33)
    model = residual_blocks(rng, tmp_path, act, "Add")
    inits = {i.name: i for i in model.graph.initializer}
    moved = 0
    for n in model.graph.node:  # the QuantizeLinears of the blocks' activation outputs
        if n.op_type == "QuantizeLinear" and n.input[0] in ("b0o", "b1o"):
            inits[n.input[2]].CopyFrom(nh.from_array(np.array(100, np.uint8), n.input[2]))
            inits[n.input[1]].CopyFrom(nh.from_array(nh.to_array(inits[n.input[1]]) * np.float32(0.5), n.input[1]))
            moved += 1
    assert moved == 2
    ours, _ = claimed_ops(model, level)
    assert ours.count("Add") >= 1, ours
    for shape in ((1, 3, 16, 16), (2, 3, 11, 7)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        assert_equals_ort(got, run(model, feeds, level, qie=False)[0][0])


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("form", ["x*sigmoid", "sigmoid*x"])
def test_silu_as_qie_quantize_leaves_it(tmp_path, level, form):
    """Conv -> SiLU chains (YOLO's, EfficientNet's; no BatchNormalization left between, as torch exports fold it)
    quantized the way `qie quantize` does by default: the SiLU stays float between a DequantizeLinear and a
    QuantizeLinear, and ORT gives the Sigmoid and the Mul each their own DequantizeLinear of the conv's codes. The
    second one is the same tensor: the table unit takes both, and every conv and SiLU runs on qie. Sigmoid is
    libm's exp where ORT's is MLAS's: within one step at the last SiLU's QuantizeLinear, nearly all equal."""
    rng = np.random.default_rng(41)
    c, inits, nodes = 8, [], []
    conv = conv3x3_adder(rng, c, inits, nodes)

    def silu(x):
        nodes.append(h.make_node("Sigmoid", [x], [x + "_s"]))
        nodes.append(h.make_node("Mul", [x, x + "_s"] if form == "x*sigmoid" else [x + "_s", x], [x + "_silu"]))
        return x + "_silu"

    y = silu(conv(silu(conv(silu(conv("x", 3, "c1", 2)), c, "c2")), c, "c3"))
    g = h.make_graph(nodes, "silu_chain", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info(y, T.FLOAT, None)], inits)
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False,
                     tmp_path, op_types=QIE_QUANTIZE_OPS)
    ours, theirs = claimed_ops(model, level)
    assert ours.count("Conv") == 3 and ours.count("Sigmoid") >= 2 and ours.count("Mul") >= 2, (ours, theirs)
    step = steps(model)
    for shape in ((1, 3, 16, 16), (2, 3, 11, 7)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        (want,), _ = run(model, feeds, level, qie=False)
        diff = np.abs(got - want)
        assert diff.max() <= 1.0001 * step and (diff > 0).mean() <= 0.02, (diff.max(), step, (diff > 0).mean())


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("form", ["HardSwish", "x*HardSigmoid(x)", "HardSigmoid(x)*x"])
def test_squeeze_excitation_with_float_prefix_as_qie_quantize_leaves_it(tmp_path, level, form):
    """PP-LCNet's block quantized the way `qie quantize` does by default (MatMul / Conv / Gemm only): a conv's
    BatchNormalization and HardSwish stay float and their result is read twice, by the squeeze-excitation's
    GlobalAveragePool and by its Mul. GAP and Mul take BatchNormalization -> HardSwish as a float prefix of their
    operand (computed as ORT's float kernels do), so the block is one region; results equal ORT's (the GAP's sum
    in another order could move a mean by a step: none here). HardSwish also as ORT's pre-processing leaves it,
    inlined as x * HardSigmoid(x): a prefix that reads its tensor twice (through two copies of its
    DequantizeLinear where ORT gives each reader its own)."""
    rng = np.random.default_rng(41)
    c, inits, nodes = 16, [], []

    def conv(x, cin, cout, k, name, group=1):
        w = (rng.normal(size=(cout, cin // group, k, k)) * (1.4 / np.sqrt(cin // group * k * k))).astype(np.float32)
        inits.append(nh.from_array(w, name + "_w"))
        nodes.append(h.make_node("Conv", [x, name + "_w"], [name], pads=[k // 2] * 4, group=group))
        return name

    def bn_hswish(x, name):
        vals = [rng.uniform(0.5, 1.5, c), rng.normal(size=c) * 0.1, rng.normal(size=c) * 0.1, rng.uniform(0.5, 2, c)]
        names = [f"{name}_{p}" for p in ("s", "b", "m", "v")]
        inits.extend(nh.from_array(v.astype(np.float32), n) for v, n in zip(vals, names))
        nodes.append(h.make_node("BatchNormalization", [x, *names], [name + "_bn"]))
        if form == "HardSwish":
            nodes.append(h.make_node("HardSwish", [name + "_bn"], [name]))
        else:
            nodes.append(h.make_node("HardSigmoid", [name + "_bn"], [name + "_hs"], alpha=1 / 6, beta=0.5))
            pair = [name + "_bn", name + "_hs"]
            nodes.append(h.make_node("Mul", pair if form.startswith("x") else pair[::-1], [name]))
        return name

    x = bn_hswish(conv("x", 3, c, 3, "c1"), "a1")
    v = bn_hswish(conv(x, c, c, 3, "dw", group=c), "a2")
    nodes.append(h.make_node("GlobalAveragePool", [v], ["g"]))
    nodes.append(h.make_node("Relu", [conv("g", c, c // 4, 1, "se1")], ["se1_r"]))
    nodes.append(h.make_node("HardSigmoid", [conv("se1_r", c // 4, c, 1, "se2")], ["s"]))
    nodes.append(h.make_node("Mul", [v, "s"], ["m"]))
    y = conv("m", c, c, 1, "pw")
    g = h.make_graph(nodes, "se", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info(y, T.FLOAT, None)], inits)
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), rng, True, False,
                     tmp_path, op_types=QIE_QUANTIZE_OPS)
    ours, theirs = claimed_ops(model, level)
    assert sorted(theirs) == ["DequantizeLinear"], theirs  # the input's QuantizeLinear runs in the region
    assert "QuantizeLinear" in ours, ours
    assert {"GlobalAveragePool", "Mul", form if form == "HardSwish" else "HardSigmoid", "BatchNormalization"} <= set(ours), ours
    for shape in ((1, 3, 16, 16), (2, 3, 9, 12)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        (got,), _ = run(model, feeds, level, qie=True)
        assert_equals_ort(got, run(model, feeds, level, qie=False)[0][0], f"{shape}")


@needs_ep
@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("opset", [13, 18])
def test_spatial_reduce_mean_and_prefixed_concat_as_qie_quantize_leaves_them(tmp_path, level, opset):
    """PP-OCRv6's stem and blocks as `qie quantize` leaves them (Conv only quantized): a Concat of a conv's output
    and a Relu'd conv branch (the Relu float, before the Concat's Q: the input's requantization table takes it),
    and squeeze-excitations that pool with ReduceMean over H and W keeping dims (axes as the attribute, or at
    opset 18 as a constant input): one region, results equal ORT's. A ReduceMean over other axes or without its
    dims is no GlobalAveragePool: left to ORT, the results still ORT's."""
    rng = np.random.default_rng(61)
    c, inits, nodes = 8, [], []

    def conv(x, cin, cout, k, name):
        w = (rng.normal(size=(cout, cin, k, k)) * (1.4 / np.sqrt(cin * k * k))).astype(np.float32)
        inits.append(nh.from_array(w, name + "_w"))
        nodes.append(h.make_node("Conv", [x, name + "_w"], [name], pads=[k // 2] * 4))
        return name

    def mean(x, name, axes, keepdims=1):
        if opset >= 18:
            inits.append(nh.from_array(np.array(axes, np.int64), name + "_axes"))
            nodes.append(h.make_node("ReduceMean", [x, name + "_axes"], [name], keepdims=keepdims))
        else:
            nodes.append(h.make_node("ReduceMean", [x], [name], axes=axes, keepdims=keepdims))
        return name

    a = conv("x", 3, c, 3, "c1")
    nodes.append(h.make_node("Relu", [conv(a, c, c, 3, "c2")], ["r"]))
    nodes.append(h.make_node("Concat", [conv(a, c, c, 1, "c1b"), "r"], ["cat"], axis=1))
    v = conv("cat", 2 * c, c, 1, "c3")
    for i, axes in enumerate(([2, 3], [-1, -2])):
        nodes.append(h.make_node("HardSigmoid", [conv(mean(v, f"m{i}", axes), c, c, 1, f"se{i}")], [f"s{i}"]))
        nodes.append(h.make_node("Mul", [v, f"s{i}"], [f"v{i}"]))
        v = conv(f"v{i}", c, c, 3, f"c{4 + i}")
    other = mean(v, "rows", [3])  # over W only: a row mean, not a GlobalAveragePool
    flat = mean(v, "flat", [2, 3], keepdims=0)
    g = h.make_graph(nodes, "stem", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                     [h.make_tensor_value_info(y, T.FLOAT, None) for y in (other, flat)], inits)
    model = quantize(h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8), rng, True, False,
                     tmp_path, op_types=QIE_QUANTIZE_OPS)
    ours, theirs = claimed_ops(model, level)
    assert ours.count("Conv") == 8 and ours.count("ReduceMean") == 2 and "Concat" in ours and "Relu" in ours, ours
    assert theirs.count("ReduceMean") == 2, theirs
    before = qie_ep.ep_stats()["regions"]
    claimed_ops(model, level)
    assert qie_ep.ep_stats()["regions"] - before == 1
    for shape in ((1, 3, 16, 16), (2, 3, 9, 12)):
        feeds = {"x": rng.normal(size=shape).astype(np.float32)}
        got, _ = run(model, feeds, level, qie=True)
        want, _ = run(model, feeds, level, qie=False)
        for g_, w_ in zip(got, want):
            assert_equals_ort(g_, w_, f"{shape}")


@needs_ep
def test_prefix_from_a_graph_input_is_not_a_unit():
    """A Mul whose float operand comes from a graph input through Relu (no DequantizeLinear to start a prefix at):
    not a unit; the session builds and equals ORT."""
    nodes = [h.make_node("Relu", ["x"], ["r"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             h.make_node("Mul", ["r", "d"], ["m"]),
             h.make_node("QuantizeLinear", ["m", "s", "z"], ["y"])]
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(128, np.uint8), "z")]
    g = h.make_graph(nodes, "graph_input_prefix", [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 3, 3]),
                                                   h.make_tensor_value_info("q", T.UINT8, [1, 4, 3, 3])],
                     [h.make_tensor_value_info("y", T.UINT8, [1, 4, 3, 3])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(1, 4, 3, 3)).astype(np.float32),
             "q": rng.integers(0, 256, size=(1, 4, 3, 3)).astype(np.uint8)}
    for level in OPT_LEVELS:
        (got,), _ = run(model, feeds, level, qie=True)
        np.testing.assert_array_equal(got, run(model, feeds, level, qie=False)[0][0])


def input_q_model(rng, c, signed, sx=0.037, zx=None, extra_codes_output=False):
    """x (float, c channels) -> QuantizeLinear -> two QDQ convs -> y; ``extra_codes_output``: the input's codes are
    also dequantized to a graph output (read outside the region)."""
    qt, lo, hi = (T.INT8, -128, 127) if signed else (T.UINT8, 0, 255)
    zx = (3 if signed else 131) if zx is None else zx
    npq = np.int8 if signed else np.uint8
    inits = [nh.from_array(np.array(sx, np.float32), "sx"), nh.from_array(np.array(zx, npq), "zx")]
    nodes = [h.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
    x, cin, s_in = "xd", c, sx
    for i, (cout, k) in enumerate([(8, 3), (5, 1)]):
        w = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
        sw = rng.uniform(0.002, 0.01, cout).astype(np.float32)
        b = rng.integers(-3000, 3000, cout).astype(np.int32)
        sy, zy = np.float32(rng.uniform(0.05, 0.2)), npq(rng.integers(lo // 2, hi // 2))
        inits += [nh.from_array(w, f"w{i}"), nh.from_array(sw, f"sw{i}"), nh.from_array(np.zeros(cout, np.int8), f"zw{i}"),
                  nh.from_array(b, f"b{i}"), nh.from_array((s_in * sw).astype(np.float32), f"sb{i}"),
                  nh.from_array(np.zeros(cout, np.int32), f"zb{i}"), nh.from_array(np.array(sy, np.float32), f"sy{i}"),
                  nh.from_array(np.array(zy, npq), f"zy{i}")]
        nodes += [h.make_node("DequantizeLinear", [f"w{i}", f"sw{i}", f"zw{i}"], [f"wd{i}"], axis=0),
                  h.make_node("DequantizeLinear", [f"b{i}", f"sb{i}", f"zb{i}"], [f"bd{i}"], axis=0),
                  h.make_node("Conv", [x, f"wd{i}", f"bd{i}"], [f"c{i}"], pads=[k // 2] * 4),
                  h.make_node("QuantizeLinear", [f"c{i}", f"sy{i}", f"zy{i}"], [f"q{i}"]),
                  h.make_node("DequantizeLinear", [f"q{i}", f"sy{i}", f"zy{i}"], [f"d{i}"])]
        x, cin, s_in = f"d{i}", cout, sy
    outputs = [h.make_tensor_value_info(x, T.FLOAT, None)]
    if extra_codes_output:
        nodes.append(h.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd_out"]))
        outputs.append(h.make_tensor_value_info("xd_out", T.FLOAT, None))
    g = h.make_graph(nodes, "input_q", [h.make_tensor_value_info("x", T.FLOAT, ["N", c, "H", "W"])], outputs, inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 19)], ir_version=9)


def special_input(rng, shape, sx, zx, signed):
    """Normal values, values on every rounding tie of x / sx around the codes (and past the clamps), NaN, +-inf,
    +-3e38 and signed zeros, scattered over channels and pixels."""
    x = rng.normal(scale=3.0, size=shape).astype(np.float32)
    flat = x.reshape(-1)
    ties = ((np.arange(-300, 300) + 0.5) * np.float32(sx)).astype(np.float32)
    special = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 0.0, -0.0, 1e-40], np.float32)
    pool = np.concatenate([ties, special])
    idx = rng.choice(flat.size, size=min(flat.size // 2, pool.size), replace=False)
    flat[idx] = rng.choice(pool, size=idx.size)
    return x


@needs_ep
@pytest.mark.parametrize("level", list(OPT_LEVELS))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("c", [1, 3, 4, 5, 19])
@pytest.mark.parametrize("threads", [1, 2])
def test_input_quantize_runs_in_the_region_with_ort_codes(level, signed, c, threads):
    """The image input's QuantizeLinear joins the region (quantized on entry straight into its NHWC buffer: C = 3
    / 4 pack each pixel's codes, other C take the generic path): ORT's codes for normal values, rounding ties of
    x / scale, NaN, infinities and huge values, on u8 / s8, batches and odd pixel counts (vector tails)."""
    rng = np.random.default_rng(100 + c)
    model = input_q_model(rng, c, signed)
    ours, theirs = claimed_ops(model, level)
    assert "QuantizeLinear" in ours and sorted(theirs) == ["DequantizeLinear"], (ours, theirs)
    so_q, so_o = options(qie=True, level=level, threads=threads), options(qie=False, level=level, threads=threads)
    s_q, s_o = session(model, so_q), session(model, so_o)
    for shape in ((1, c, 16, 16), (2, c, 7, 9), (1, c, 1, 1), (3, c, 33, 5), (0, c, 4, 4)):
        x = special_input(rng, shape, 0.037, 3 if signed else 131, signed)
        assert_equals_ort(s_q.run(None, {"x": x})[0], s_o.run(None, {"x": x})[0], f"{shape}")


@needs_ep
def test_input_quantize_read_outside_stays_with_ort():
    """Codes of the input's QuantizeLinear that a node outside the region also reads: the QuantizeLinear stays with
    ORT (its output must exist), the region reads its codes as before; results equal ORT's."""
    rng = np.random.default_rng(5)
    model = input_q_model(rng, 3, False, extra_codes_output=True)
    ours, theirs = claimed_ops(model)
    assert "QuantizeLinear" in theirs and "Conv" in ours, (ours, theirs)
    x = special_input(rng, (2, 3, 11, 10), 0.037, 131, False)
    got = session(model, options(qie=True)).run(None, {"x": x})
    want = session(model, options(qie=False)).run(None, {"x": x})
    for g, w in zip(got, want):
        assert_equals_ort(g, w)


@needs_ep
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_input_quantize_portable_path(isa):
    """The input quantizer's portable loop (ISA paths without a vector one; the EP library reads QIE_ISA when it
    loads, hence a fresh process): ORT's codes for C = 3 and 5, u8 and s8, with the special values."""
    import subprocess
    import sys

    if isa not in qie_ep.supported_isas():
        pytest.skip(f"{isa} not on this CPU")
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import numpy as np\n"
        "from test_ep_regions import input_q_model, special_input, assert_equals_ort\n"
        "from qie_ep.session import options, session\n"
        "rng = np.random.default_rng(9)\n"
        "for c in (3, 5):\n"
        "    for signed in (False, True):\n"
        "        m = input_q_model(rng, c, signed)\n"
        "        x = special_input(rng, (2, c, 9, 7), 0.037, 3 if signed else 131, signed)\n"
        "        assert_equals_ort(session(m, options(qie=True)).run(None, {'x': x})[0],\n"
        "                          session(m, options(qie=False)).run(None, {'x': x})[0], f'{c} {signed}')\n"
        "import qie_ep; assert qie_ep.ep_stats()['region_runs'] >= 4, qie_ep.ep_stats()\n"
        "print('ok')\n")
    here = __import__("pathlib").Path(__file__).resolve().parent
    env = dict(__import__("os").environ, QIE_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code, str(here), str(here.parent)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-2000:]
