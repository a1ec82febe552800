"""Every spec rule refuses a bad fixture, and says where: file:path."""

import glob
import os
import re
import shutil

import pytest
import yaml

from conftest import SPEC
from hypercall_gen import model

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "spec_bad", "*.yaml")))


def _header(path):
    where = expect = None
    for line in open(path, encoding="utf-8"):
        if line.startswith("# where:"):
            where = line.split(":", 1)[1].strip()
        elif line.startswith("# expect:"):
            expect = line.split(":", 1)[1].strip()
    assert where and expect, f"{path}: fixture needs '# where:' and '# expect:' lines"
    return where, expect


def _spec_with(tmp_path, extra=None, replace=None):
    """A copy of the real spec plus an extra document or a replaced one."""
    d = tmp_path / "spec"
    shutil.copytree(SPEC, d)
    if extra:
        # sorts after the real documents, so duplicates are reported here
        shutil.copy(extra, d / ("zz_" + os.path.basename(extra)))
    for name, doc in (replace or {}).items():
        with open(d / name, "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    return d


def test_the_real_spec_loads(spec):
    assert spec.hypercalls and spec.uapi.ioctls


def test_there_is_a_fixture_per_rule():
    assert len(FIXTURES) >= 25


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: os.path.basename(p)[:-5])
def test_bad_fixture_is_refused(tmp_path, fixture):
    where, expect = _header(fixture)
    where = "zz_" + where
    d = _spec_with(tmp_path, extra=fixture)
    with pytest.raises(model.SpecError) as e:
        model.load(str(d))
    msg = str(e.value)
    assert msg.startswith(where + ":") or msg.startswith(where + " "), msg
    assert re.search(expect, msg), msg


def _uapi():
    with open(os.path.join(SPEC, "uapi.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def _ioctl(doc, name):
    return next(x for x in doc["uapi"]["ioctls"] if x["name"] == name)


def test_duplicate_ioctl_number_on_one_fd(tmp_path):
    doc = _uapi()
    dup = dict(_ioctl(doc, "MSHV_CREATE_VP"), name="MSHV_CREATE_VP_AGAIN")
    doc["uapi"]["ioctls"].append(dup)
    with pytest.raises(model.SpecError, match=r"^uapi\.yaml:uapi\.ioctls\[\d+\]: duplicate ioctl "
                       r"number 0x4004b801 on the partition fd"):
        model.load(str(_spec_with(tmp_path, replace={"uapi.yaml": doc})))


def test_same_number_on_different_fds_is_fine(spec):
    nums = [(x.number, fd) for x in spec.uapi.ioctls for fd in x.fds]
    assert len(nums) == len(set(nums))
    assert any(a.number & 0xff == b.number & 0xff and a.fds.keys() != b.fds.keys()
               for a in spec.uapi.ioctls for b in spec.uapi.ioctls if a is not b)


def test_extended_argument_must_extend_the_small_one(tmp_path):
    doc = _uapi()
    _ioctl(doc, "MSHV_CREATE_PARTITION")["extended"]["arg"] = "mshv_user_mem_region"
    with pytest.raises(model.SpecError, match=r"^uapi\.yaml:uapi\.ioctls\[0\]\.extended: field "
                       r"'pt_flags' of mshv_create_partition is not a prefix field"):
        model.load(str(_spec_with(tmp_path, replace={"uapi.yaml": doc})))


def test_check_names_an_unknown_constant(tmp_path):
    doc = _uapi()
    _ioctl(doc, "MSHV_IRQFD")["checks"][0]["mask"] = "MSHV_NO_SUCH_MASK"
    with pytest.raises(model.SpecError, match=r"^uapi\.yaml:uapi\.ioctls\[\d+\]\.checks\[0\]: "
                       r"unknown constant 'MSHV_NO_SUCH_MASK'"):
        model.load(str(_spec_with(tmp_path, replace={"uapi.yaml": doc})))


def test_check_names_an_unknown_field(tmp_path):
    doc = _uapi()
    _ioctl(doc, "MSHV_IRQFD")["checks"][0]["field"] = "flagz"
    with pytest.raises(model.SpecError, match=r"checks\[0\]: no field 'flagz' in mshv_user_irqfd"):
        model.load(str(_spec_with(tmp_path, replace={"uapi.yaml": doc})))


def test_uapi_struct_cannot_use_hypervisor_types(tmp_path):
    doc = _uapi()
    doc["uapi"]["structs"][2]["fields"][0]["type"] = "hv_proximity_domain_info"
    doc["uapi"]["structs"][2]["size"] = 8
    with pytest.raises(model.SpecError, match=r"^uapi\.yaml:uapi\.structs\[2\]\.fields\[0\]: "
                       r"unknown type 'hv_proximity_domain_info'"):
        model.load(str(_spec_with(tmp_path, replace={"uapi.yaml": doc})))


def test_flexible_array_needs_a_trailer(tmp_path):
    doc = _uapi()
    del _ioctl(doc, "MSHV_SET_MSI_ROUTING")["trailer"]
    with pytest.raises(model.SpecError, match=r"\.arg: an argument with a flexible array needs a trailer"):
        model.load(str(_spec_with(tmp_path, replace={"uapi.yaml": doc})))


def test_copy_out_needs_a_readable_direction(tmp_path):
    doc = _uapi()
    _ioctl(doc, "MSHV_CREATE_VP")["copy_out"] = "always"
    with pytest.raises(model.SpecError, match=r"\.copy_out: copy_out needs dir r or rw"):
        model.load(str(_spec_with(tmp_path, replace={"uapi.yaml": doc})))
