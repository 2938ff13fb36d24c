// Test helper: the content of an HDF5 file, object by object, for showing
// that two ways of writing a checkpoint produce the same file content
// (Note [Sharded save paths] in checkpoint/checkpoint.cpp). Content means
// every group and dataset by path, each dataset's type, shape, storage
// layout, filter count and stored bytes, and every attribute's type, shape
// and value; it does not mean the byte offsets HDF5 chose on disk, which
// depend on the driver.
#pragma once

#include <hdf5.h>

#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace motley::hdf5_content {

namespace detail {

// Class, size and byte order of a type.
inline std::string describe_type(hid_t type) {
  return "class " + std::to_string(static_cast<int>(H5Tget_class(type))) + " size " +
         std::to_string(H5Tget_size(type)) +
         (H5Tget_class(type) == H5T_INTEGER || H5Tget_class(type) == H5T_FLOAT
              ? " order " + std::to_string(static_cast<int>(H5Tget_order(type)))
              : std::string());
}

inline std::string describe_space(hid_t space, hssize_t* points) {
  const int rank = H5Sget_simple_extent_ndims(space);
  std::vector<hsize_t> dims(rank > 0 ? rank : 0);
  if (rank > 0) H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  *points = H5Sget_simple_extent_npoints(space);
  std::string out = " dims (";
  for (hsize_t d : dims) out += std::to_string(d) + ",";
  return out + ")";
}

// One attribute: its type, shape and value, read with the file's own type
// (the stored bytes, no conversion) or, for variable-length strings, as text.
inline herr_t add_attribute(hid_t obj, const char* name, const H5A_info_t*, void* data) {
  auto* out = static_cast<std::map<std::string, std::string>*>(data);
  std::string& entry = (*out)[std::string("@") + name];
  const hid_t attr = H5Aopen(obj, name, H5P_DEFAULT);
  const hid_t type = H5Aget_type(attr);
  const hid_t space = H5Aget_space(attr);
  hssize_t points = 0;
  entry = "attribute " + describe_type(type) + describe_space(space, &points) + " value ";
  if (H5Tis_variable_str(type) > 0) {
    std::vector<char*> values(points > 0 ? points : 1, nullptr);
    H5Aread(attr, type, values.data());
    for (hssize_t i = 0; i < points; ++i) entry += std::string(values[i] ? values[i] : "") + "|";
    H5Dvlen_reclaim(type, space, H5P_DEFAULT, values.data());
  } else {
    std::string bytes(static_cast<std::size_t>(points) * H5Tget_size(type), '\0');
    H5Aread(attr, type, bytes.data());
    entry += bytes;
  }
  H5Sclose(space);
  H5Tclose(type);
  H5Aclose(attr);
  return 0;
}

// The object at `path` (its attributes as path@name) and, for a group,
// everything below it. A dataset's data is read with the file's own type.
inline void add_object(hid_t file, const std::string& path,
                       std::map<std::string, std::string>& out) {
  const hid_t obj = H5Oopen(file, path.c_str(), H5P_DEFAULT);
  ASSERT_GE(obj, 0) << path;
  std::map<std::string, std::string> attrs;
  H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_INC, nullptr, add_attribute, &attrs);
  for (const auto& [name, value] : attrs) out[path + name] = value;
  if (H5Iget_type(obj) == H5I_GROUP) {
    out[path] = "group";
    H5G_info_t info;
    H5Gget_info(obj, &info);
    for (hsize_t i = 0; i < info.nlinks; ++i) {
      const ssize_t len =
          H5Lget_name_by_idx(obj, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
      std::string name(static_cast<std::size_t>(len), '\0');
      H5Lget_name_by_idx(obj, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), len + 1,
                         H5P_DEFAULT);
      add_object(file, (path == "/" ? "/" : path + "/") + name, out);
    }
  } else {
    const hid_t type = H5Dget_type(obj);
    const hid_t space = H5Dget_space(obj);
    const hid_t dcpl = H5Dget_create_plist(obj);
    hssize_t points = 0;
    std::string entry = "dataset " + describe_type(type) + describe_space(space, &points) +
                        " layout " + std::to_string(static_cast<int>(H5Pget_layout(dcpl))) +
                        " filters " + std::to_string(H5Pget_nfilters(dcpl)) + " data ";
    std::string bytes(static_cast<std::size_t>(points) * H5Tget_size(type), '\0');
    if (!bytes.empty()) {
      EXPECT_GE(H5Dread(obj, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()), 0) << path;
    }
    out[path] = entry + bytes;
    H5Pclose(dcpl);
    H5Sclose(space);
    H5Tclose(type);
  }
  H5Oclose(obj);
}

}  // namespace detail

// Path (attributes as path@name) -> description, for every object of the
// file at `path`.
inline std::map<std::string, std::string> content(const std::string& path) {
  std::map<std::string, std::string> out;
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  EXPECT_GE(file, 0) << "cannot open " << path;
  if (file < 0) return out;
  detail::add_object(file, "/", out);
  H5Fclose(file);
  return out;
}

// Expects the two files to hold the same objects with the same content,
// naming the first differing ones.
inline void expect_same_content(const std::string& a, const std::string& b) {
  const std::map<std::string, std::string> x = content(a), y = content(b);
  EXPECT_GT(x.size(), 1u) << a << " is empty";
  for (const auto& [key, value] : x) {
    const auto it = y.find(key);
    if (it == y.end()) {
      ADD_FAILURE() << key << " is in " << a << " but not in " << b;
    } else {
      // Not EXPECT_EQ: the values hold raw bytes.
      EXPECT_TRUE(it->second == value) << key << " differs between " << a << " and " << b;
    }
  }
  for (const auto& [key, value] : y) {
    EXPECT_TRUE(x.count(key) > 0) << key << " is in " << b << " but not in " << a;
  }
}

}  // namespace motley::hdf5_content
